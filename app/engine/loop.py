"""`python -m app train CONFIG.py [--key=value ...]`: the training engine.

One loop for every task: the task gives data, a loss module and metrics; this file gives data order,
gradient accumulation, mixed precision, multi-process (accelerate: DDP under `accelerate launch` or
`torchrun`, or FSDP2 sharding with parallelism='fsdp', app/lm/fsdp.py), the optimizer and schedule,
evaluation, checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from app import checkpoint as ckpt
from app.lm import fsdp
from app.engine.batching import BatchPlan
from app.engine.optim import make_optimizer, make_scheduler
from app.engine.runlog import RunLog
from app.config import Config
from app.errors import UserError
from app.tasks import get_task
from app.tasks.protocol import EvalContext, Feature, Task

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
def make_accelerator(cfg: Config, ddp_options: dict | None = None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    handlers = [DistributedDataParallelKwargs(**ddp_options)] if ddp_options else []
    return Accelerator(mixed_precision=mp, cpu=not cuda, kwargs_handlers=handlers)


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


def loss_counts(task: Task, feature: Feature) -> dict[str, int]:
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


def write_training_curves(out_dir: Path) -> None:
    """training_curves.png next to metrics.jsonl (matplotlib, when installed); never fails the run."""
    try:
        from app.metrics.plots import save_training_curves
    except ImportError:
        return
    try:
        save_training_curves(out_dir)
    except Exception as err:  # a plot must never cost a finished run
        log.warning("training curves not written: %s: %s", type(err).__name__, err)


def encode_all(task: Task, rows, tokenizer, cfg: Config, path: str, limit: int | None = None) -> list[Feature]:
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


def encode_window_sources(task: Task, rows, tokenizer, cfg: Config, path: str) -> list[Feature]:
    """The examples a windowed plan cuts its windows from, kept whole whatever their length (the windows are what
    must fit max_seq_length)."""
    return encode_all(task, rows, tokenizer, cfg, path, limit=sys.maxsize)


def train_window(task: Task, cfg: Config) -> int:
    """The task's training window (0: whole examples); one longer than max_seq_length is refused."""
    window = task.train_window(cfg) or 0
    if window > cfg.max_seq_length:
        raise UserError(f"the training window of {window} tokens is longer than max_seq_length={cfg.max_seq_length}")
    return window


def cut_window(f: Feature, start: int, length: int) -> Feature:
    """`length` tokens of an example from `start` (input ids and labels; extra as it is)."""
    return Feature(f.input_ids[start : start + length], f.labels[start : start + length], f.line, f.extra)


def step_examples(task: Task, plan: BatchPlan, features, loss_items, slots: list[list[int]], step: int):
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


# --- checkpoints ------------------------------------------------------------------------------------------
def save_checkpoint(name, accelerator, task, objective, model, tokenizer, optimizer, scheduler, state, cfg,
                    sharded: bool = False) -> Path:
    """Every process calls this. Sharded: the optimizer state and the full weights are gathered to rank 0 while it
    writes them, so the checkpoint is the same as a single process writes."""
    out = cfg.out_path
    tmp, final = ckpt.temp_dir(out, name), ckpt.checkpoints_dir(out) / name
    if accelerator.is_main_process:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    ckpt.save_rng(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    optimizer_state = fsdp.full_optimizer_state(objective, optimizer) if sharded else optimizer.state_dict()
    with fsdp.gathered(objective) if sharded else contextlib.nullcontext():
        if accelerator.is_main_process:
            task.save_weights(model, tokenizer, tmp)
            task.save_extra(objective, tmp, cfg)
            if name == "final" or name.startswith("best"):  # the model card, before publish: the manifest covers it
                from app.modelcard import write_model_card

                write_model_card(tmp, cfg, name, state.step)
            ckpt.save_optimizer_state(optimizer_state, tmp)
            ckpt.save_scheduler(scheduler, tmp)
            ckpt.write_json(tmp / "run_config.json", cfg.model_dump())
            ckpt.write_json(tmp / "trainer_state.json", asdict(state))  # written last: marks the dir complete
            ckpt.publish(tmp, final)
            if name.startswith("step_"):
                ckpt.prune(out, cfg.keep_last)
            log.info("checkpoint %s written", name)
        accelerator.wait_for_everyone()
    return final


# --- evaluation -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_out_dir(cfg: Config, is_main: bool):
    """Where an evaluation writes its files: the run directory on rank 0, a scratch directory removed afterwards on
    the other processes of a sharded run (which evaluate too, their files unused)."""
    if is_main:
        yield cfg.out_path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="eval-") as scratch:
        yield Path(scratch)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(task, objective, model, tokenizer, cfg, dev_rows, dev_features, accelerator, ctx: EvalContext) -> dict:
    """dev_loss (the weighted total of the per-item dev losses; with several losses also dev_loss/<name>) and the
    task's own metrics."""
    objective.eval()
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(dev_features), cfg.micro_batch_size):
        chunk = dev_features[i : i + cfg.micro_batch_size]
        batch = to_device(task.collate(chunk, tokenizer.pad_token_id), ctx.device)
        with accelerator.autocast():
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
    rows = dev_rows[: cfg.eval_rows] if cfg.eval_rows else dev_rows
    metrics.update(task.evaluate(model, tokenizer, cfg, rows, ctx))
    objective.train()
    return metrics


def improved_bests(task: Task, cfg: Config, metrics: dict, state: TrainState) -> list[str]:
    """Names of the best-by-metric checkpoints this evaluation beats (and records them in state)."""
    names = []
    for name, (metric, mode) in task.best_checkpoints(cfg).items():
        value, old = metrics[metric], state.best.get(name)
        if old is None or (value < old["value"] if mode == "min" else value > old["value"]):
            state.best[name] = {"metric": metric, "value": value, "step": state.step}
            names.append(name)
    return names


# --- logging ----------------------------------------------------------------------------------------------
# --- the run ----------------------------------------------------------------------------------------------
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


def optimizer_param_names(objective, optimizer) -> list[str]:
    """The optimizer's parameters by name, in its own order (what torch's state_dict indices count)."""
    names = {id(p): n for n, p in objective.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def load_optimizer(resume_from: Path, objective, optimizer, sharded: bool, rank: int) -> None:
    """The optimizer state of a checkpoint, written by a sharded run or not, onto this run's optimizer."""
    names = optimizer_param_names(objective, optimizer)
    if not sharded:
        optimizer.load_state_dict(ckpt.keyed_by(ckpt.read_optimizer_state(resume_from), names, by_name=False))
        return
    full = ckpt.keyed_by(ckpt.read_optimizer_state(resume_from), names, by_name=True) if rank == 0 else {}
    fsdp.load_full_optimizer_state(objective, optimizer, full)


def restore(resume_from: Path, state: TrainState, task, objective, optimizer, scheduler, rank: int,
            sharded: bool = False) -> TrainState:
    """Everything a checkpoint holds besides the weights (the model's loaded with the model, the task's extra ones
    before sharding): optimizer, schedule, this process's RNG, and the data position; returns the resumed state."""
    saved = ckpt.read_json(resume_from / "trainer_state.json")
    if saved["world_size"] != state.world_size:
        log.warning("resuming a %d-process run on %d processes: data order changes from here", saved["world_size"],
                    state.world_size)
    resumed = TrainState(**{**saved, "total_steps": state.total_steps, "world_size": state.world_size})
    load_optimizer(resume_from, objective, optimizer, sharded, rank)
    ckpt.load_scheduler(scheduler, resume_from)
    ckpt.load_rng(resume_from, rank if (resume_from / f"rng_rank{rank}.json").exists() else 0)
    log.info("resumed from %s at step %d", resume_from, resumed.step)
    return resumed


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


def _train(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    task = get_task(cfg.task)
    # bad data is reported before any model loads
    train_rows = task.load_rows(cfg, "train")
    dev_rows = task.load_rows(cfg, "dev")
    if cfg.resume == "fresh":
        check_fresh_target(cfg)
    from app.runs import ensure_base_model

    ensure_base_model(cfg)
    accelerator = make_accelerator(cfg, task.ddp_options(cfg))
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    sharded = uses_fsdp(cfg, world)
    if sharded and (changes := task.fsdp_overrides(cfg)):
        log.info("parallelism='fsdp': %s", ", ".join(f"{k}={v!r}" for k, v in changes.items()))
        cfg = cfg.model_copy(update=changes)
    accumulation = accumulation_steps(cfg, world)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    is_main = accelerator.is_main_process
    resume_from = find_resume_point(cfg, is_main)
    accelerator.wait_for_everyone()
    if resume_from is not None and resume_from.name == "final":
        print(f"{cfg.out_dir}: run already complete ({resume_from}); use --resume=fresh to train again")
        return 0

    torch.manual_seed(cfg.seed)
    model, tokenizer = task.load_model(cfg, device, resume_from)
    if is_main:  # the model loaded: only now does the run directory change
        if cfg.resume == "fresh":
            move_previous_aside(cfg)
        cfg.out_path.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(cfg.out_path / "run_config.json", cfg.model_dump())
        from app.sources import run_sources  # beside run_config.json: path or Hub id + revision + fingerprint

        ckpt.write_json(cfg.out_path / "data_sources.json", run_sources(cfg))
    from app.report.runinfo import RunRecord  # run_info.json + warnings.log, read by `python -m app report`

    record = RunRecord.start(cfg, world, sharded) if is_main else None
    accelerator.wait_for_everyone()
    from app.engine.token_cache import encode_cached

    window = train_window(task, cfg)
    features = encode_cached(task, train_rows, tokenizer, cfg, cfg.train_file, "train",
                             encode_window_sources if window else encode_all)
    dev_features = encode_cached(task, dev_rows, tokenizer, cfg, cfg.dev_file, "dev", encode_all) if dev_rows else []
    plan = BatchPlan(tuple(len(f.input_ids) for f in features), cfg.micro_batch_size, world, accumulation,
                     cfg.seed, cfg.group_by_length, window)
    if plan.steps_per_epoch == 0:
        raise UserError(f"{cfg.train_file}: {len(features)} usable examples, fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * plan.steps_per_epoch)
    if record is not None:
        record.data(features, dev_features, plan, len(train_rows), len(dev_rows))
    loss_items = [loss_counts(task, f) for f in features]  # per example, counted once: the step loop only adds them up
    loss_weights = task.loss_weights(cfg)
    loss_names = list(dict.fromkeys(n for counts in loss_items for n in counts))

    objective = task.objective(model, cfg)
    objective.to(device)
    if resume_from is not None:
        task.load_extra(objective, resume_from)
    if sharded:  # parameters become DTensor shards: the optimizer is built on them
        fsdp.shard(objective, task.shard_blocks(objective, cfg), cfg.fsdp_cpu_offload)
    groups = task.param_groups(objective, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(cfg, groups)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    state = TrainState(total_steps=total_steps, world_size=world, seed=cfg.seed)
    if resume_from is not None:
        state = restore(resume_from, state, task, objective, optimizer, scheduler, rank, sharded)
    if sharded:
        ddp_objective, optimizer = objective, accelerator.prepare(optimizer)
    else:
        ddp_objective, optimizer = accelerator.prepare(objective, optimizer)

    n_trainable = sum(p.numel() for p in params)
    log.info("%d train / %d dev examples; %d steps (%d per epoch), global batch %d = %d x %d accumulation x %d "
             "processes%s; %.2fM trainable parameters", len(features), len(dev_features), total_steps,
             plan.steps_per_epoch, cfg.batch_size, cfg.micro_batch_size, accumulation, world,
             " (FSDP2)" if sharded else "", n_trainable / 1e6)
    run_log = RunLog(cfg, state.step, is_main)
    progress = None
    if is_main:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True, file=sys.stderr)

    save = lambda name: save_checkpoint(name, accelerator, task, objective, model, tokenizer, optimizer,  # noqa: E731
                                        scheduler, state, cfg, sharded)
    epoch_steps, epoch_of_plan = None, -1
    pending_losses, pending_norms, pending_items, window_tokens, window_start = [], [], [], 0, time.perf_counter()
    steps_this_run, last_metrics = 0, {}
    objective.train()
    while state.step < total_steps:
        epoch, step_in_epoch = plan.position(state.step)
        if epoch != epoch_of_plan:
            epoch_steps, epoch_of_plan = plan.epoch_order(epoch), epoch
        # every process knows the whole global batch, so the loss normaliser needs no communication
        examples = step_examples(task, plan, features, loss_items, epoch_steps[step_in_epoch], state.step)
        global_items = {n: sum(items.get(n, 0) for slot in examples for _, items in slot) for n in loss_names}
        window_tokens += sum(len(f.input_ids) for slot in examples for f, _ in slot)

        # ---- one optimizer step ----
        step_loss = torch.zeros(len(loss_names), device=device)
        micro_batches = [examples[s] for s in plan.rank_slots(rank)]
        for k, micro in enumerate(micro_batches):
            batch = to_device(task.collate([f for f, _ in micro], tokenizer.pad_token_id), device)
            sync = k == len(micro_batches) - 1
            with gradient_sync(accelerator, ddp_objective, sync, sharded), accelerator.autocast():
                sums = named_losses(ddp_objective(**batch))
                accelerator.backward(weighted_total(sums, global_items, loss_weights, world))
            step_loss += torch.stack([sums[n].detach().float() for n in loss_names])
        grad_norm = fsdp.full_tensor(accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.epoch, state.step_in_epoch = plan.position(state.step)
        steps_this_run += 1
        pending_losses.append(step_loss)
        pending_norms.append(grad_norm.detach().float())
        pending_items.append((global_items, scheduler.get_last_lr()))

        # ---- logging (the only host sync, every log_every steps) ----
        last = state.step == total_steps
        if state.step % cfg.log_every == 0 or last or stop.signum is not None:
            losses = accelerator.reduce(torch.stack(pending_losses), reduction="sum").tolist()
            elapsed = time.perf_counter() - window_start
            norms = torch.stack(pending_norms).tolist()  # already global: clipping all-reduces gradients first
            for i, (loss, norm, (items, lrs)) in enumerate(zip(losses, norms, pending_items)):
                step = state.step - len(losses) + i + 1
                run_log.write(step, {**loss_values(loss_names, loss, items, loss_weights), **lr_values(lrs),
                                     "grad_norm": norm})
            tps = window_tokens / elapsed
            run_log.write(state.step, {"tokens_per_s": tps})
            if progress is not None:
                shown = loss_values(loss_names, losses[-1], pending_items[-1][0], loss_weights)["loss"]
                progress.set_postfix(loss=f"{shown:.4f}", lr=f"{max(pending_items[-1][1]):.2e}", tok_s=f"{tps:,.0f}")
                progress.update(len(losses))
            pending_losses, pending_norms, pending_items, window_tokens, window_start = [], [], [], 0, time.perf_counter()

        if world > 1:  # every process must stop at the same step
            flag = torch.tensor([0 if stop.signum is None else stop.signum], device=device)
            flag = accelerator.reduce(flag, reduction="sum")
            if int(flag) and stop.signum is None:
                stop.signum = signal.SIGTERM

        if dev_features and (state.step % cfg.eval_every == 0 or last) and stop.signum is None:
            decision = [[], state.best]  # decided on rank 0, shared with all
            if is_main or sharded:  # sharded: every process takes part in each forward, rank 0's results count
                with eval_out_dir(cfg, is_main) as eval_dir, fsdp.root_gathered(objective) if sharded else \
                        contextlib.nullcontext():
                    ctx = EvalContext(state.step, state.step // plan.steps_per_epoch, plan.steps_per_epoch, eval_dir,
                                      objective, device)
                    metrics = evaluate(task, objective, model, tokenizer, cfg, dev_rows, dev_features, accelerator, ctx)
            if is_main:
                last_metrics = metrics
                run_log.write(state.step, {f"eval/{k}": v for k, v in last_metrics.items()})
                log.info("step %d eval: %s", state.step, ", ".join(f"{k}={v:.4f}" for k, v in last_metrics.items()))
                decision = [improved_bests(task, cfg, last_metrics, state), state.best]
            if world > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(decision)
            improved, state.best = decision
            for name in improved:
                save(name)

        if last:
            final_dir = save("final")
            if is_main:
                task.on_train_end(cfg, final_dir)
        elif state.step % cfg.save_every == 0 or stop.signum is not None or steps_this_run == cfg.stop_after_steps:
            save(ckpt.step_name(state.step))
        if stop.signum is not None or (steps_this_run == cfg.stop_after_steps and not last):
            break

    if progress is not None:
        progress.close()
    run_log.close()
    if is_main:
        write_training_curves(cfg.out_path)
        record.finish(state.step, total_steps, stop.signum)
    accelerator.wait_for_everyone()
    if is_main and state.step == total_steps:
        summary = {"step": state.step, "out_dir": str(cfg.out_dir), **last_metrics}
        print("final " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if world > 1:
        torch.distributed.destroy_process_group()
    if stop.signum is not None:
        log.warning("stopped by %s at step %d; re-run the same command to resume", signal.Signals(stop.signum).name,
                    state.step)
        return stop.exit_code
    return 0


def train(cfg: Config) -> int:
    """Run (or resume) the training described by cfg; returns the process exit code."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        return _train(cfg)
    finally:
        from app.report.runinfo import close_run_record

        close_run_record()
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
