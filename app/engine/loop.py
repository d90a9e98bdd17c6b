"""`python -m app train CONFIG.py [--key=value ...]`: the training engine.

One loop for every task: the task gives data, a loss module and metrics; this file gives data order,
gradient accumulation, mixed precision, multi-process (accelerate: DDP under `accelerate launch` or
`torchrun`), the optimizer and schedule, evaluation, checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from app.engine import checkpoint as ckpt
from app.engine.batching import BatchPlan
from app.engine.optim import make_optimizer, make_scheduler
from app.engine.runlog import RunLog
from app.config import Config, load_config
from app.errors import UserError
from app.tasks import Feature, Task, get_task

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
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=mp, cpu=not cuda)


def encode_all(task: Task, rows, tokenizer, cfg: Config, path: str) -> list[Feature]:
    """Tokenize; count, report and handle examples over max_seq_length as the config says."""
    features, over = [], 0
    for row in rows:
        f = task.encode(row, tokenizer, cfg)
        if len(f.input_ids) > cfg.max_seq_length:
            over += 1
            if cfg.overlength == "error":
                raise UserError(f"{path}:{row.line}: {len(f.input_ids)} tokens > max_seq_length={cfg.max_seq_length} "
                                "(set overlength='truncate' or 'drop')")
            if cfg.overlength == "drop":
                continue
            f = task.truncate(f, cfg.max_seq_length)
            if f is None:
                continue
        if task.loss_items(f) > 0:
            features.append(f)
    if over:
        log.warning("%s: %d of %d examples longer than max_seq_length=%d (%s)", path, over, len(rows),
                    cfg.max_seq_length, cfg.overlength)
    return features


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
def save_checkpoint(name, accelerator, task, objective, model, tokenizer, optimizer, scheduler, state, cfg):
    out = cfg.out_path
    tmp = ckpt.temp_dir(out, name)
    if accelerator.is_main_process:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    ckpt.save_rng(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if hasattr(model, "peft_config"):
            # added-token rows travel as trainable-token deltas; the resized matrices are rebuilt at load
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        task.save_extra(objective, tmp)
        ckpt.save_optimizer(optimizer, tmp)
        ckpt.save_scheduler(scheduler, tmp)
        (tmp / "run_config.json").write_text(cfg.to_json(), encoding="utf-8")
        ckpt.write_json(tmp / "trainer_state.json", asdict(state))  # written last: marks the dir complete
        ckpt.publish(tmp, ckpt.checkpoints_dir(out) / name)
        if name.startswith("step_"):
            ckpt.prune(out, cfg.keep_last)
        log.info("checkpoint %s written", name)
    accelerator.wait_for_everyone()


# --- evaluation -------------------------------------------------------------------------------------------
@torch.no_grad()
def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(task, objective, model, tokenizer, cfg, dev_rows, dev_features, device, accelerator, step) -> dict:
    objective.eval()
    total, items = 0.0, 0
    for i in range(0, len(dev_features), cfg.micro_batch_size):
        chunk = dev_features[i : i + cfg.micro_batch_size]
        batch = to_device(task.collate(chunk, tokenizer.pad_token_id), device)
        with accelerator.autocast():
            total += float(objective(**batch))
        items += sum(task.loss_items(f) for f in chunk)
    metrics = {"dev_loss": total / max(items, 1)}
    rows = dev_rows[: cfg.eval_rows] if cfg.eval_rows else dev_rows
    metrics.update(task.evaluate(model, tokenizer, cfg, rows, device, step))
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
def prepare_out_dir(cfg: Config, is_main: bool) -> Path | None:
    """The checkpoint to resume from, or None. `resume='fresh'` moves old checkpoints aside, never deletes."""
    root = ckpt.checkpoints_dir(cfg.out_dir)
    if cfg.resume == "fresh" and root.exists() and is_main:
        aside = root.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(root, aside)
        metrics = cfg.out_path / "metrics.jsonl"
        if metrics.exists():
            os.replace(metrics, aside / "metrics.jsonl")
        print(f"resume='fresh': moved previous checkpoints to {aside}", file=sys.stderr)
    if is_main:
        ckpt.clean_temp(cfg.out_dir)
    return ckpt.latest(cfg.out_dir)


def _train(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    task = get_task(cfg.task)
    # bad data is reported before any model loads
    train_rows = task.load_rows(cfg, "train")
    dev_rows = task.load_rows(cfg, "dev")
    if cfg.create_tiny_model:
        from app.lm.tiny import ensure_tiny_model

        ensure_tiny_model(cfg.model_name)

    accelerator = make_accelerator(cfg)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise UserError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size} "
                        f"x {world} processes")
    accumulation = cfg.batch_size // (cfg.micro_batch_size * world)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    is_main = accelerator.is_main_process
    if is_main:
        cfg.out_path.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(cfg.out_path / "run_config.json", cfg.model_dump())
    accelerator.wait_for_everyone()
    resume_from = prepare_out_dir(cfg, is_main)
    accelerator.wait_for_everyone()
    if resume_from is not None and resume_from.name == "final":
        print(f"{cfg.out_dir}: run already complete ({resume_from}); use --resume=fresh to train again")
        return 0

    torch.manual_seed(cfg.seed)
    model, tokenizer = task.load_model(cfg, device, resume_from)
    features = encode_all(task, train_rows, tokenizer, cfg, cfg.train_file)
    dev_features = encode_all(task, dev_rows, tokenizer, cfg, cfg.dev_file) if dev_rows else []
    plan = BatchPlan(tuple(len(f.input_ids) for f in features), cfg.micro_batch_size, world, accumulation,
                     cfg.seed, cfg.group_by_length)
    if plan.steps_per_epoch == 0:
        raise UserError(f"{cfg.train_file}: {len(features)} usable examples, fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * plan.steps_per_epoch)
    loss_items = [task.loss_items(f) for f in features]  # per example, counted once: the step loop only adds them up

    objective = task.objective(model, cfg)
    objective.to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    state = TrainState(total_steps=total_steps, world_size=world, seed=cfg.seed)
    if resume_from is not None:
        saved = ckpt.read_json(resume_from / "trainer_state.json")
        if saved["world_size"] != world:
            log.warning("resuming a %d-process run on %d processes: data order changes from here", saved["world_size"], world)
        state = TrainState(**{**saved, "total_steps": total_steps, "world_size": world})
        task.load_extra(objective, resume_from)
        ckpt.load_optimizer(optimizer, resume_from)
        ckpt.load_scheduler(scheduler, resume_from)
        rng_rank = rank if (resume_from / f"rng_rank{rank}.json").exists() else 0
        ckpt.load_rng(resume_from, rng_rank)
        log.info("resumed from %s at step %d", resume_from, state.step)
    ddp_objective, optimizer = accelerator.prepare(objective, optimizer)

    n_trainable = sum(p.numel() for p in params)
    log.info("%d train / %d dev examples; %d steps (%d per epoch), global batch %d = %d x %d accumulation x %d "
             "processes; %.2fM trainable parameters", len(features), len(dev_features), total_steps,
             plan.steps_per_epoch, cfg.batch_size, cfg.micro_batch_size, accumulation, world, n_trainable / 1e6)
    run_log = RunLog(cfg, state.step, is_main)
    progress = None
    if is_main:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True, file=sys.stderr)

    save = lambda name: save_checkpoint(name, accelerator, task, objective, model, tokenizer, optimizer,  # noqa: E731
                                        scheduler, state, cfg)
    epoch_steps, epoch_of_plan = None, -1
    pending_losses, pending_norms, pending_items, window_tokens, window_start = [], [], [], 0, time.perf_counter()
    steps_this_run, last_metrics = 0, {}
    objective.train()
    while state.step < total_steps:
        epoch, step_in_epoch = plan.position(state.step)
        if epoch != epoch_of_plan:
            epoch_steps, epoch_of_plan = plan.epoch_order(epoch), epoch
        # every process knows the whole global batch, so the loss normaliser needs no communication
        slots = epoch_steps[step_in_epoch]
        global_items = sum(loss_items[i] for slot in slots for i in slot)
        window_tokens += sum(plan.lengths[i] for slot in slots for i in slot)

        # ---- one optimizer step ----
        step_loss = torch.zeros((), device=device)
        micro_batches = plan.micro_batches(epoch_steps, step_in_epoch, rank)
        for k, indices in enumerate(micro_batches):
            batch = to_device(task.collate([features[i] for i in indices], tokenizer.pad_token_id), device)
            sync = k == len(micro_batches) - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(ddp_objective)), accelerator.autocast():
                loss_sum = ddp_objective(**batch)
                # DDP averages gradients over processes: scale so the result is the global per-item mean
                accelerator.backward(loss_sum * world / global_items)
            step_loss += loss_sum.detach()
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.epoch, state.step_in_epoch = plan.position(state.step)
        steps_this_run += 1
        pending_losses.append(step_loss)
        pending_norms.append(grad_norm.detach().float())
        pending_items.append((global_items, scheduler.get_last_lr()[0]))

        # ---- logging (the only host sync, every log_every steps) ----
        last = state.step == total_steps
        if state.step % cfg.log_every == 0 or last or stop.signum is not None:
            losses = accelerator.reduce(torch.stack(pending_losses), reduction="sum").tolist()
            elapsed = time.perf_counter() - window_start
            norms = torch.stack(pending_norms).tolist()  # already global: clipping all-reduces gradients first
            for i, (loss, norm, (items, lr)) in enumerate(zip(losses, norms, pending_items)):
                step = state.step - len(losses) + i + 1
                run_log.write(step, {"loss": loss / items, "lr": lr, "grad_norm": norm})
            tps = window_tokens / elapsed
            run_log.write(state.step, {"tokens_per_s": tps})
            if progress is not None:
                progress.set_postfix(loss=f"{losses[-1] / pending_items[-1][0]:.4f}", lr=f"{pending_items[-1][1]:.2e}",
                                     tok_s=f"{tps:,.0f}")
                progress.update(len(losses))
            pending_losses, pending_norms, pending_items, window_tokens, window_start = [], [], [], 0, time.perf_counter()

        if world > 1:  # every process must stop at the same step
            flag = torch.tensor([0 if stop.signum is None else stop.signum], device=device)
            flag = accelerator.reduce(flag, reduction="sum")
            if int(flag) and stop.signum is None:
                stop.signum = signal.SIGTERM

        if dev_features and (state.step % cfg.eval_every == 0 or last) and stop.signum is None:
            decision = [[], state.best]  # decided on rank 0, shared with all
            if is_main:
                last_metrics = evaluate(task, objective, model, tokenizer, cfg, dev_rows, dev_features, device,
                                        accelerator, state.step)
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
            save("final")
        elif state.step % cfg.save_every == 0 or stop.signum is not None or steps_this_run == cfg.stop_after_steps:
            save(ckpt.step_name(state.step))
        if stop.signum is not None or (steps_this_run == cfg.stop_after_steps and not last):
            break

    if progress is not None:
        progress.close()
    run_log.close()
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


def cli(argv: list[str]) -> int:
    if not argv or argv[0].startswith("--"):
        raise UserError("usage: python -m app train CONFIG.py [--key=value ...]")
    cfg = load_config(argv[0], argv[1:])
    return train(cfg)


def train(cfg: Config) -> int:
    """Run (or resume) the training described by cfg; returns the process exit code."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        return _train(cfg)
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
