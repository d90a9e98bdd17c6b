"""The training engine, a library: `train(cfg, task, hooks)` runs (or resumes) one training run.

One loop for every task: the task gives data, a loss module and metrics; this file gives data order,
gradient accumulation, mixed precision, multi-process (accelerate: DDP under `accelerate launch` or
`torchrun`, or FSDP2 sharding with parallelism='fsdp', app/lm/fsdp.py), the optimizer and schedule,
evaluation, checkpoints and exact resume.

A run is three parts over one `Run` object: `setup` (data read and checked, processes, model, run directory,
tokenized data and its plan, optimizer, resumed state), `fit` (the optimizer steps, with logging, evaluation and
checkpoints between them) and `finish` (logs closed, the summary line, the exit code). What a command adds to the run
directory (`python -m app train`: app/train.py) comes in through `RunHooks`; the engine imports no task and no
command.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm import tqdm

from app import checkpoint as ckpt
from app.config import Config
from app.data import Feature
from app.engine.batching import BatchPlan
from app.engine.context import EvalContext
from app.engine.optim import make_optimizer, make_scheduler
from app.engine.runlog import RunLog
from app.engine.token_cache import encode_cached
from app.errors import UserError
from app.lm import fsdp
from app.lm.kind import ModelKind

log = logging.getLogger("app.engine.loop")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best: dict = field(default_factory=dict)  # checkpoint name -> {"metric", "value", "step"}
    world_size: int = 1
    seed: int = 0


# --- setup ------------------------------------------------------------------------------------------------
def make_accelerator(cfg: Config):
    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=mp, cpu=not cuda)


def uses_fsdp(cfg: Config, world: int) -> bool:
    """Whether this run shards with FSDP2 (parallelism='fsdp' on more than one process)."""
    if cfg.parallelism != "fsdp":
        return False
    if cfg.quantization is not None:
        raise UserError(f"parallelism='fsdp' does not shard quantized weights (quantization={cfg.quantization!r}): "
                        "use parallelism='ddp' for QLoRA, or quantization=None")
    if world == 1:
        log.warning("parallelism='fsdp' on one process: nothing to shard over, training unsharded")
        return False
    return True


def gradient_sync(accelerator, model, sync: bool, sharded: bool):
    """The context of one micro batch's backward: gradients synchronised only on the last of an optimizer step."""
    if sharded:
        fsdp.gradient_sync(model, sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def accumulation_steps(cfg: Config, world: int) -> int:
    """Micro batches per optimizer step on each process: batch_size / (micro_batch_size x processes), exactly."""
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise UserError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size} "
                        f"x {world} processes")
    return cfg.batch_size // (cfg.micro_batch_size * world)


def loss_counts(task, feature: Feature) -> dict[str, int]:
    """The task's loss items of one example, by loss name ("loss" when the task has a single loss)."""
    items = task.loss_items(feature)
    return dict(items) if isinstance(items, dict) else {"loss": int(items)}


def named_losses(out) -> dict:
    """An objective's output as {name: summed loss}."""
    return dict(out) if isinstance(out, dict) else {"loss": out}


def weighted_total(sums: dict, global_items: dict[str, int], weights: dict[str, float], world: int):
    """What one micro batch backpropagates: each summed loss over its count in the whole global batch, weighted.
    DDP averages gradients over processes, hence the factor `world`: the result is the global per-item mean."""
    total = 0
    for name, value in sums.items():
        if global_items.get(name):
            term = value * world / global_items[name]
            total = total + (term if weights.get(name, 1.0) == 1.0 else weights[name] * term)
    return total


def loss_values(names: list[str], sums: list[float], items: dict[str, int], weights: dict[str, float]) -> dict:
    """Logged losses of one step: `loss` (the weighted total of the per-item means), and `loss/<name>` for each when
    there are several."""
    means = {n: s / items[n] for n, s in zip(names, sums) if items.get(n)}
    out = {"loss": sum(weights.get(n, 1.0) * v for n, v in means.items())}
    if len(names) > 1:
        out.update({f"loss/{n}": v for n, v in means.items()})
    return out


def lr_values(lrs: list[float]) -> dict:
    """Logged learning rates: `lr` (the largest group's), and `lr/<group>` for each when there are several groups."""
    out = {"lr": max(lrs)}
    if len(lrs) > 1:
        out.update({f"lr/{i}": v for i, v in enumerate(lrs)})
    return out


def encode_all(task, rows, tokenizer, cfg: Config, path: str, limit: int | None = None) -> list[Feature]:
    """Tokenize; count, report and handle examples over `limit` (max_seq_length) as the config says."""
    limit = cfg.max_seq_length if limit is None else limit
    features, over = [], 0
    for row in rows:
        f = task.encode(row, tokenizer, cfg)
        if len(f.input_ids) > limit:
            over += 1
            if cfg.overlength == "error":
                raise UserError(f"{path}:{row.line}: {len(f.input_ids)} tokens > max_seq_length={cfg.max_seq_length} "
                                "(set overlength='truncate' or 'drop')")
            if cfg.overlength == "drop":
                continue
            f = task.truncate(f, cfg.max_seq_length)
            if f is None:
                continue
        if sum(loss_counts(task, f).values()) > 0:
            features.append(f)
    if over:
        log.warning("%s: %d of %d examples longer than max_seq_length=%d (%s)", path, over, len(rows),
                    cfg.max_seq_length, cfg.overlength)
    return features


def encode_window_sources(task, rows, tokenizer, cfg: Config, path: str) -> list[Feature]:
    """The examples a windowed plan cuts its windows from, kept whole whatever their length (the windows are what
    must fit max_seq_length)."""
    return encode_all(task, rows, tokenizer, cfg, path, limit=sys.maxsize)


def train_window(task, cfg: Config) -> int:
    """The task's training window (0: whole examples); one longer than max_seq_length is refused."""
    window = task.train_window(cfg) or 0
    if window > cfg.max_seq_length:
        raise UserError(f"the training window of {window} tokens is longer than max_seq_length={cfg.max_seq_length}")
    return window


def cut_window(f: Feature, start: int, length: int) -> Feature:
    """`length` tokens of an example from `start` (input ids and labels; extra as it is)."""
    return Feature(f.input_ids[start : start + length], f.labels[start : start + length], f.line, f.extra)


def step_examples(task, plan: BatchPlan, features, loss_items, slots: list[list[int]], step: int):
    """[micro-batch slot] -> [(feature, loss counts)] of global step `step` (its `slots` of example indices): the
    examples or, with a windowed plan, their windows at this step's offsets (counted here: a window holds part of its
    example's loss items)."""
    if not plan.window:
        return [[(features[i], loss_items[i]) for i in slot] for slot in slots]
    starts = plan.window_starts(*plan.position(step), slots)
    cut = [[cut_window(features[i], s, plan.window) for i, s in zip(slot, ss)] for slot, ss in zip(slots, starts)]
    return [[(f, loss_counts(task, f)) for f in slot] for slot in cut]


class StopFlag:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit 143/130. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class RunHooks:
    """What the command running the engine adds to a run (`python -m app train`: app/train.py): the engine calls
    these at fixed points and needs none of them. `before_model` and `close` run on every process, the others on the
    main process only."""

    def before_model(self, cfg: Config) -> None:
        """Before the processes start and the model loads (e.g. build the base model the config names)."""

    def on_run_dir(self, run: Run) -> None:
        """The model loaded and the run directory holds run_config.json; the data is not tokenized yet."""

    def on_data(self, run: Run) -> None:
        """The data is tokenized and planned (run.features, run.dev_features, run.plan)."""

    def on_checkpoint(self, run: Run, name: str, directory: Path) -> None:
        """Checkpoint `name` is written to `directory` but not published: a file added here is in its manifest."""

    def on_finish(self, run: Run) -> None:
        """This invocation's steps are over (finished or stopped), metrics.jsonl closed."""

    def close(self) -> None:
        """Last, always, also when the run raised."""


@dataclass
class LogWindow:
    """The steps since the last log line, their values still on the device: fetched together, the only host sync."""

    losses: list = field(default_factory=list)  # per step: the summed losses of this process, by loss name
    norms: list = field(default_factory=list)  # per step: the gradient norm
    items: list = field(default_factory=list)  # per step: (global loss counts, learning rates)
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """One invocation of `train`: what `setup` builds, `fit` advances and `finish` closes."""

    cfg: Config  # as resolved for this run (a sharded run's overrides applied)
    task: object  # the task protocol (app/tasks/protocol.py)
    kind: ModelKind  # the task's model kind
    hooks: RunHooks
    accelerator: object
    sharded: bool
    accumulation: int
    stop: StopFlag
    resume_from: Path | None = None
    model: object = None
    tokenizer: object = None
    train_rows: list = field(default_factory=list)
    dev_rows: list = field(default_factory=list)
    features: list = field(default_factory=list)
    dev_features: list = field(default_factory=list)
    plan: BatchPlan | None = None
    loss_items: list = field(default_factory=list)  # per training example: {loss name: count}
    loss_names: list = field(default_factory=list)
    loss_weights: dict = field(default_factory=dict)
    state: TrainState = field(default_factory=TrainState)
    objective: object = None  # the task's loss module
    ddp_objective: object = None  # the same, wrapped for DDP (sharded: itself)
    params: list = field(default_factory=list)  # the trained parameters (what is clipped)
    optimizer: object = None
    scheduler: object = None
    run_log: RunLog | None = None
    progress: object = None
    window: LogWindow = field(default_factory=LogWindow)
    steps_this_run: int = 0
    last_metrics: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


# --- checkpoints ------------------------------------------------------------------------------------------
def save_checkpoint(run: Run, name: str) -> Path:
    """Every process calls this. Sharded: the optimizer state and the full weights are gathered to rank 0 while it
    writes them, so the checkpoint is the same as a single process writes."""
    accelerator, cfg, objective = run.accelerator, run.cfg, run.objective
    out = cfg.out_path
    tmp, final = ckpt.temp_dir(out, name), ckpt.checkpoints_dir(out) / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    ckpt.save_rng(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    optimizer_state = fsdp.full_optimizer_state(objective, run.optimizer) if run.sharded else \
        run.optimizer.state_dict()
    with fsdp.gathered(objective) if run.sharded else contextlib.nullcontext():
        if accelerator.is_main_process:
            run.kind.save(run.model, run.tokenizer, tmp)
            run.task.save_extra(objective, tmp, cfg)
            run.hooks.on_checkpoint(run, name, tmp)  # before publish: the manifest covers what it adds
            ckpt.save_optimizer_state(optimizer_state, tmp)
            ckpt.save_scheduler(run.scheduler, tmp)
            ckpt.write_json(tmp / "run_config.json", cfg.model_dump())
            ckpt.write_json(tmp / "trainer_state.json", asdict(run.state))  # written last: marks the dir complete
            ckpt.publish(tmp, final)
            if name.startswith("step_"):
                ckpt.prune(out, cfg.keep_last)
            log.info("checkpoint %s written", name)
        accelerator.wait_for_everyone()
    return final


def optimizer_param_names(objective, optimizer) -> list[str]:
    """The optimizer's parameters by name, in its own order (what torch's state_dict indices count)."""
    names = {id(p): n for n, p in objective.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def load_optimizer(run: Run) -> None:
    """The optimizer state of a checkpoint, written by a sharded run or not, onto this run's optimizer."""
    names = optimizer_param_names(run.objective, run.optimizer)
    saved = ckpt.read_optimizer_state(run.resume_from) if not run.sharded or run.rank == 0 else None
    if not run.sharded:
        run.optimizer.load_state_dict(ckpt.keyed_by(saved, names, by_name=False))
        return
    full = ckpt.keyed_by(saved, names, by_name=True) if run.rank == 0 else {}
    fsdp.load_full_optimizer_state(run.objective, run.optimizer, full)


def restore(run: Run) -> TrainState:
    """Everything a checkpoint holds besides the weights (the model's loaded with the model, the task's extra ones
    before sharding): optimizer, schedule, this process's RNG, and the data position; returns the resumed state."""
    resume_from, state, rank = run.resume_from, run.state, run.rank
    saved = ckpt.read_json(resume_from / "trainer_state.json")
    if saved["world_size"] != state.world_size:
        log.warning("resuming a %d-process run on %d processes: data order changes from here", saved["world_size"],
                    state.world_size)
    resumed = TrainState(**{**saved, "total_steps": state.total_steps, "world_size": state.world_size})
    load_optimizer(run)
    ckpt.load_scheduler(run.scheduler, resume_from)
    ckpt.load_rng(resume_from, rank if (resume_from / f"rng_rank{rank}.json").exists() else 0)
    log.info("resumed from %s at step %d", resume_from, resumed.step)
    return resumed


# --- evaluation -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_out_dir(cfg: Config, is_main: bool):
    """Where an evaluation writes its files: the run directory on rank 0, a scratch directory removed afterwards on
    the other processes of a sharded run (which evaluate too, their files unused)."""
    if is_main:
        yield cfg.out_path
        return
    with tempfile.TemporaryDirectory(prefix="eval-") as scratch:
        yield Path(scratch)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(run: Run, ctx: EvalContext) -> dict:
    """dev_loss (the weighted total of the per-item dev losses; with several losses also dev_loss/<name>) and the
    task's own metrics."""
    task, objective, cfg = run.task, run.objective, run.cfg
    objective.eval()
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(run.dev_features), cfg.micro_batch_size):
        chunk = run.dev_features[i : i + cfg.micro_batch_size]
        batch = to_device(task.collate(chunk, run.tokenizer.pad_token_id), ctx.device)
        with run.accelerator.autocast():
            for name, value in named_losses(objective(**batch)).items():
                totals[name] = totals.get(name, 0.0) + float(value)
        for f in chunk:
            for name, n in loss_counts(task, f).items():
                counts[name] = counts.get(name, 0) + n
    means = {name: totals[name] / max(counts.get(name, 0), 1) for name in totals}
    weights = task.loss_weights(cfg)
    metrics = {"dev_loss": sum(weights.get(k, 1.0) * v for k, v in means.items())}
    if len(means) > 1:
        metrics.update({f"dev_loss/{k}": v for k, v in means.items()})
    rows = run.dev_rows[: cfg.eval_rows] if cfg.eval_rows else run.dev_rows
    metrics.update(task.evaluate(run.model, run.tokenizer, cfg, rows, ctx))
    objective.train()
    return metrics


def evaluate_and_keep_bests(run: Run) -> None:
    """Evaluate on the dev set, log the metrics, and write the best-by-metric checkpoints this evaluation beats."""
    cfg, state, is_main, objective = run.cfg, run.state, run.is_main, run.objective
    decision = [[], state.best]  # decided on rank 0, shared with all
    if is_main or run.sharded:  # sharded: every process takes part in each forward, rank 0's results count
        with eval_out_dir(cfg, is_main) as eval_dir, fsdp.root_gathered(objective) if run.sharded else \
                contextlib.nullcontext():
            ctx = EvalContext(state.step, state.step // run.plan.steps_per_epoch, run.plan.steps_per_epoch, eval_dir,
                              objective, run.device)
            metrics = evaluate(run, ctx)
    if is_main:
        run.last_metrics = metrics
        run.run_log.write(state.step, {f"eval/{k}": v for k, v in metrics.items()})
        log.info("step %d eval: %s", state.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        decision = [improved_bests(run.task, cfg, metrics, state), state.best]
    if run.world > 1:
        broadcast_object_list(decision)
    improved, state.best = decision
    for name in improved:
        save_checkpoint(run, name)


def improved_bests(task, cfg: Config, metrics: dict, state: TrainState) -> list[str]:
    """Names of the best-by-metric checkpoints this evaluation beats (and records them in state)."""
    names = []
    for name, (metric, mode) in task.best_checkpoints(cfg).items():
        value, old = metrics[metric], state.best.get(name)
        if old is None or (value < old["value"] if mode == "min" else value > old["value"]):
            state.best[name] = {"metric": metric, "value": value, "step": state.step}
            names.append(name)
    return names



# --- the run directory ----------------------------------------------------------------------------------
_OWN_ENTRY = re.compile(r"^(step_\d+|final|best[\w.-]*|\.tmp-.*|\.old-.*)$")


def check_fresh_target(cfg: Config) -> None:
    """`resume='fresh'` only ever moves the run's own checkpoints: an out_dir whose checkpoints/ holds anything else,
    or that holds other runs, is refused (an empty or mistyped out_dir must not move every run aside)."""
    out, root = cfg.out_path, ckpt.checkpoints_dir(cfg.out_dir)
    foreign = sorted(p.name for p in root.iterdir() if not _OWN_ENTRY.match(p.name)) if root.is_dir() else []
    others = sorted(p.name for p in out.iterdir() if p.is_dir() and (p / "checkpoints").is_dir()) if out.is_dir() else []
    if foreign or others:
        what = f"{root} holds {', '.join(foreign[:3])}" if foreign else f"{out} holds other runs ({', '.join(others[:3])})"
        raise UserError(f"out_dir={cfg.out_dir!r}: resume='fresh' refused: {what}, not only this run's checkpoints; "
                        "give the run's own directory")


def find_resume_point(cfg: Config, is_main: bool) -> Path | None:
    """The checkpoint to resume from (None with resume='fresh', or when there is none); a killed writer's leftovers
    are cleaned first."""
    if cfg.resume == "fresh":
        return None
    if is_main:
        ckpt.clean_temp(cfg.out_dir)
    return ckpt.latest(cfg.out_dir)


def move_previous_aside(cfg: Config) -> None:
    """`resume='fresh'`: the run's old checkpoints and metrics go to checkpoints.old-<time>/, never deleted. Done
    only once the model has loaded, so a run that cannot start leaves the old one where it was."""
    root = ckpt.checkpoints_dir(cfg.out_dir)
    if not root.exists():
        return
    aside = root.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(root, aside)
    metrics = cfg.out_path / "metrics.jsonl"
    if metrics.exists():
        os.replace(metrics, aside / "metrics.jsonl")
    print(f"resume='fresh': moved previous checkpoints to {aside}", file=sys.stderr)


# --- setup ------------------------------------------------------------------------------------------------
def start_processes(cfg: Config, task, hooks: RunHooks) -> Run:
    """The accelerator and what follows from the number of processes: sharding (and the settings it changes), the
    accumulation steps; the stop flag installed."""
    accelerator = make_accelerator(cfg)
    kind = task.model_kind(cfg)
    sharded = uses_fsdp(cfg, accelerator.num_processes)
    if sharded and (changes := kind.fsdp_overrides(cfg)):
        log.info("parallelism='fsdp': %s", ", ".join(f"{k}={v!r}" for k, v in changes.items()))
        cfg = cfg.model_copy(update=changes)
    accumulation = accumulation_steps(cfg, accelerator.num_processes)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return Run(cfg, task, kind, hooks, accelerator, sharded, accumulation, stop)


def open_run_dir(run: Run) -> None:
    """The model loaded: only now does the run directory change (resume='fresh' moves the old run aside)."""
    cfg = run.cfg
    if run.is_main:
        if cfg.resume == "fresh":
            move_previous_aside(cfg)
        cfg.out_path.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(cfg.out_path / "run_config.json", cfg.model_dump())
        run.hooks.on_run_dir(run)
    run.accelerator.wait_for_everyone()


def prepare_data(run: Run) -> None:
    """Tokenized training and dev examples, the data plan, the step count and the loss counts of every example."""
    cfg, task = run.cfg, run.task
    window = train_window(task, cfg)
    run.features = encode_cached(task, run.train_rows, run.tokenizer, cfg, "train",
                                 encode_window_sources if window else encode_all)
    run.dev_features = encode_cached(task, run.dev_rows, run.tokenizer, cfg, "dev", encode_all) if run.dev_rows else []
    run.plan = plan = BatchPlan(tuple(len(f.input_ids) for f in run.features), cfg.micro_batch_size, run.world,
                                run.accumulation, cfg.seed, cfg.group_by_length, window)
    if plan.steps_per_epoch == 0:
        raise UserError(f"{cfg.train_file}: {len(run.features)} usable examples, fewer than one batch of "
                        f"{cfg.batch_size}")
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * plan.steps_per_epoch)
    run.state = TrainState(total_steps=total_steps, world_size=run.world, seed=cfg.seed)
    if run.is_main:
        run.hooks.on_data(run)
    # per example, counted once: the step loop only adds them up
    run.loss_items = [loss_counts(task, f) for f in run.features]
    run.loss_weights = task.loss_weights(cfg)
    run.loss_names = list(dict.fromkeys(n for counts in run.loss_items for n in counts))


def prepare_optimisation(run: Run) -> None:
    """The task's loss module (sharded when asked), the optimizer and schedule over the model kind's parameter
    groups, the state of a checkpoint to resume from, and the DDP wrapping."""
    cfg, task = run.cfg, run.task
    run.objective = objective = task.objective(run.model, run.tokenizer, cfg)
    objective.to(run.device)
    if run.resume_from is not None:
        task.load_extra(objective, run.resume_from)
    if run.sharded:  # parameters become DTensor shards: the optimizer is built on them
        fsdp.shard(objective, run.kind.shard_blocks(objective), cfg.fsdp_cpu_offload)
    groups = run.kind.param_groups(objective, cfg)
    run.params = [p for g in groups for p in g["params"]]
    run.optimizer = make_optimizer(cfg, groups)
    run.scheduler = make_scheduler(cfg, run.optimizer, run.state.total_steps)
    if run.resume_from is not None:
        run.state = restore(run)
    if run.sharded:
        run.ddp_objective, run.optimizer = objective, run.accelerator.prepare(run.optimizer)
    else:
        run.ddp_objective, run.optimizer = run.accelerator.prepare(objective, run.optimizer)


def open_logs(run: Run) -> None:
    """The run's summary line, metrics.jsonl (cut back to the resumed step) and the progress bar."""
    cfg, state, plan = run.cfg, run.state, run.plan
    n_trainable = sum(p.numel() for p in run.params)
    log.info("%d train / %d dev examples; %d steps (%d per epoch), global batch %d = %d x %d accumulation x %d "
             "processes%s; %.2fM trainable parameters", len(run.features), len(run.dev_features), state.total_steps,
             plan.steps_per_epoch, cfg.batch_size, cfg.micro_batch_size, run.accumulation, run.world,
             " (FSDP2)" if run.sharded else "", n_trainable / 1e6)
    run.run_log = RunLog(cfg, state.step, run.is_main)
    if run.is_main:
        run.progress = tqdm(total=state.total_steps, initial=state.step, desc="train", dynamic_ncols=True,
                            file=sys.stderr)


def setup(cfg: Config, task, hooks: RunHooks) -> Run | None:
    """Everything before the first step; None when the run is already complete."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # bad data is reported before any model loads
    train_rows = task.load_rows(cfg, "train")
    dev_rows = task.load_rows(cfg, "dev")
    if cfg.resume == "fresh":
        check_fresh_target(cfg)
    hooks.before_model(cfg)
    run = start_processes(cfg, task, hooks)
    run.train_rows, run.dev_rows = train_rows, dev_rows
    run.resume_from = find_resume_point(run.cfg, run.is_main)
    run.accelerator.wait_for_everyone()
    if run.resume_from is not None and run.resume_from.name == "final":
        print(f"{run.cfg.out_dir}: run already complete ({run.resume_from}); use --resume=fresh to train again")
        return None
    torch.manual_seed(run.cfg.seed)
    run.model, run.tokenizer = run.kind.load(run.cfg, run.device, run.resume_from)
    open_run_dir(run)
    prepare_data(run)
    prepare_optimisation(run)
    open_logs(run)
    return run


# --- fit --------------------------------------------------------------------------------------------------
def optimizer_step(run: Run, examples) -> None:
    """One optimizer step over the global batch `examples` ([micro-batch slot] -> [(feature, loss counts)]): this
    process's micro batches, accumulated, clipped, stepped; the values to log kept on the device."""
    cfg, state, plan, task = run.cfg, run.state, run.plan, run.task
    accelerator, ddp_objective, device, world = run.accelerator, run.ddp_objective, run.device, run.world
    loss_names, loss_weights, pending = run.loss_names, run.loss_weights, run.window
    global_items = {n: sum(items.get(n, 0) for slot in examples for _, items in slot) for n in loss_names}
    pending.tokens += sum(len(f.input_ids) for slot in examples for f, _ in slot)

    step_loss = torch.zeros(len(loss_names), device=device)
    micro_batches = [examples[s] for s in plan.rank_slots(run.rank)]
    for k, micro in enumerate(micro_batches):
        batch = to_device(task.collate([f for f, _ in micro], run.tokenizer.pad_token_id), device)
        sync = k == len(micro_batches) - 1
        with gradient_sync(accelerator, ddp_objective, sync, run.sharded), accelerator.autocast():
            sums = named_losses(ddp_objective(**batch))
            accelerator.backward(weighted_total(sums, global_items, loss_weights, world))
        step_loss += torch.stack([sums[n].detach().float() for n in loss_names])
    grad_norm = fsdp.full_tensor(accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm or float("inf")))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.epoch, state.step_in_epoch = plan.position(state.step)
    run.steps_this_run += 1
    pending.losses.append(step_loss)
    pending.norms.append(grad_norm.detach().float())
    pending.items.append((global_items, run.scheduler.get_last_lr()))


def flush_log(run: Run) -> None:
    """The steps of the log window to metrics.jsonl and the progress bar (the only host sync)."""
    state, pending, names, weights = run.state, run.window, run.loss_names, run.loss_weights
    losses = run.accelerator.reduce(torch.stack(pending.losses), reduction="sum").tolist()
    elapsed = time.perf_counter() - pending.start
    norms = torch.stack(pending.norms).tolist()  # already global: clipping all-reduces gradients first
    for i, (loss, norm, (items, lrs)) in enumerate(zip(losses, norms, pending.items)):
        step = state.step - len(losses) + i + 1
        run.run_log.write(step, {**loss_values(names, loss, items, weights), **lr_values(lrs), "grad_norm": norm})
    tps = pending.tokens / elapsed
    run.run_log.write(state.step, {"tokens_per_s": tps})
    if run.progress is not None:
        shown = loss_values(names, losses[-1], pending.items[-1][0], weights)["loss"]
        run.progress.set_postfix(loss=f"{shown:.4f}", lr=f"{max(pending.items[-1][1]):.2e}", tok_s=f"{tps:,.0f}")
        run.progress.update(len(losses))
    run.window = LogWindow()


def agree_on_stop(run: Run) -> None:
    """Every process must stop at the same step: a signal one of them received stops them all."""
    if run.world > 1:
        flag = torch.tensor([0 if run.stop.signum is None else run.stop.signum], device=run.device)
        flag = run.accelerator.reduce(flag, reduction="sum")
        if int(flag) and run.stop.signum is None:
            run.stop.signum = signal.SIGTERM


def save_due_checkpoints(run: Run, last: bool) -> None:
    """The final checkpoint after the last step (then the task's end hook), a step checkpoint when one is due."""
    cfg, state = run.cfg, run.state
    if last:
        final_dir = save_checkpoint(run, "final")
        if run.is_main:
            run.task.on_train_end(cfg, final_dir)
    elif state.step % cfg.save_every == 0 or run.stop.signum is not None or run.steps_this_run == cfg.stop_after_steps:
        save_checkpoint(run, ckpt.step_name(state.step))


def fit(run: Run) -> None:
    """Optimizer steps until the last one, a stop signal or stop_after_steps; logging, evaluation and checkpoints
    between them."""
    cfg, state, plan, stop = run.cfg, run.state, run.plan, run.stop
    epoch_steps, epoch_of_plan = None, -1
    run.window = LogWindow()  # the first tokens_per_s counts from the first step, not from setup
    run.objective.train()
    while state.step < state.total_steps:
        epoch, step_in_epoch = plan.position(state.step)
        if epoch != epoch_of_plan:
            epoch_steps, epoch_of_plan = plan.epoch_order(epoch), epoch
        # every process knows the whole global batch, so the loss normaliser needs no communication
        examples = step_examples(run.task, plan, run.features, run.loss_items, epoch_steps[step_in_epoch], state.step)
        optimizer_step(run, examples)
        last = state.step == state.total_steps
        if state.step % cfg.log_every == 0 or last or stop.signum is not None:
            flush_log(run)
        agree_on_stop(run)
        if run.dev_features and (state.step % cfg.eval_every == 0 or last) and stop.signum is None:
            evaluate_and_keep_bests(run)
        save_due_checkpoints(run, last)
        if stop.signum is not None or (run.steps_this_run == cfg.stop_after_steps and not last):
            break


# --- finish -----------------------------------------------------------------------------------------------
def finish(run: Run) -> int:
    """Logs closed, the command's end-of-run work, the summary line of a finished run; the exit code (128 + the
    signal of a stopped run)."""
    state, stop = run.state, run.stop
    if run.progress is not None:
        run.progress.close()
    run.run_log.close()
    if run.is_main:
        run.hooks.on_finish(run)
    run.accelerator.wait_for_everyone()
    if run.is_main and state.step == state.total_steps:
        summary = {"step": state.step, "out_dir": str(run.cfg.out_dir), **run.last_metrics}
        print("final " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if run.world > 1:
        torch.distributed.destroy_process_group()
    if stop.signum is not None:
        log.warning("stopped by %s at step %d; re-run the same command to resume", signal.Signals(stop.signum).name,
                    state.step)
        return stop.exit_code
    return 0


def train(cfg: Config, task, hooks: RunHooks | None = None) -> int:
    """Run (or resume) the training `cfg` describes with `task` (the protocol of app/tasks/protocol.py); returns the
    process exit code. `hooks`: what the calling command adds to the run (default: nothing)."""
    hooks = hooks or RunHooks()
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        run = setup(cfg, task, hooks)
        if run is None:
            return 0
        fit(run)
        return finish(run)
    finally:
        hooks.close()
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
