"""Part 5, resume on CUDA: a training run killed after a checkpoint and re-run ends where an uninterrupted one does.

As tests/test_resume.py does on CPU: `python -m app train configs/default.py --key=value ...` (the NLI recipe, bf16
LoRA on CUDA, dropout on so the RNG state matters) is started, SIGKILLed once its first step checkpoint exists, and
started again with the same command; an uninterrupted run of the same config is the reference (run in this process
while the first one trains). Compared: the final adapter weights (relative L2 distance, and max abs difference as a
figure) and every step's logged loss and learning rate.

Tolerances: CUDA kernels are not bitwise deterministic (atomics in attention backward, split-K matmuls), and bf16
rounds those differences up, so on CUDA the weights must agree to 1e-2 relative L2 and the losses to 1e-2 relative;
on CPU (fp32, deterministic) the same run agrees to 1e-5. The learning rate schedule must match exactly (a second
warmup would show there).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from kit import ROOT, RECIPE, Context, UnitError, check, config_args, ensure_model, recipe_overrides, use_repo_imports


def tolerance(ctx: Context) -> float:
    return 1e-2 if ctx.profile.cuda else 1e-5


def run(ctx: Context) -> dict:
    model_dir = ensure_model(ctx, "resume")
    try:
        res = ctx.unit("part_resume:resume_unit", model_dir=model_dir)
    except UnitError as err:
        return {"figures": {}, "checks": [check("resume runs", False, str(err))], "notes": []}
    tol = tolerance(ctx)
    checks = [
        check("killed after a checkpoint", res["killed_at_checkpoint"] is not None and not res["killed_run_finished"],
              f"SIGKILL with step {res['killed_at_checkpoint']} on disk" if res["killed_at_checkpoint"] else
              "the run ended before a checkpoint appeared"),
        check("re-run resumed", res["resumed"] and res["resumed_rc"] == 0,
              f"exit {res['resumed_rc']}, {'resumed from a checkpoint' if res['resumed'] else 'did not resume'}"),
    ]
    if "weights_rel_l2" in res:
        checks += [
            check("weights equal after resume", res["weights_rel_l2"] <= tol,
                  f"relative L2 {res['weights_rel_l2']:.2e}, max abs {res['weights_max_abs']:.2e} (limit {tol:g})"),
            check("losses equal after resume", res["loss_rel_max"] <= tol and res["steps_logged"] == res["steps"],
                  f"{res['steps_logged']}/{res['steps']} steps logged, max relative loss difference "
                  f"{res['loss_rel_max']:.2e}"),
            check("learning rates equal after resume", res["lr_equal"], "every step's lr as the reference's"),
        ]
    return {"figures": res, "checks": checks, "notes": []}


def command(ctx: Context, model_dir: str, out: Path) -> list[str]:
    return [ctx.python, "-m", "app", "train", str(RECIPE.relative_to(ROOT)),
            *config_args(run_values(ctx, model_dir, out))]


def run_values(ctx: Context, model_dir: str, out: Path) -> dict:
    p = ctx.profile
    return recipe_overrides(ctx, model_dir, str(out), quantization=None, max_steps=p.resume_steps,
                            save_every=p.resume_save_every, keep_last=2, warmup_steps=2, learning_rate=1e-3,
                            **p.resume_batch)


# cuBLAS picks a fixed reduction order with a fixed workspace: one source of run-to-run noise fewer (attention
# backward and other kernels still use atomics, hence the tolerance)
CUBLAS = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def run_env(ctx: Context) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **CUBLAS}
    if not ctx.profile.cuda:
        env.setdefault("OMP_NUM_THREADS", "1")  # on a small CPU the killed run shares the cores with the reference
    return env


def start(ctx: Context, cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=run_env(ctx))


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step_name: str, result: dict, timeout: float) -> None:
    """SIGKILL `proc` as soon as its first step checkpoint is published (the directory appears by rename)."""
    target = out / "checkpoints" / step_name
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if target.is_dir():
            proc.send_signal(signal.SIGKILL)
            result["killed_at_checkpoint"] = step_name
            break
        time.sleep(0.01)
    proc.wait()
    result["killed_run_finished"] = (out / "checkpoints" / "final").exists()


def resume_unit(ctx: Context, model_dir: str) -> dict:
    use_repo_imports()
    os.environ.update(CUBLAS)  # before this process's first matmul: the reference trains here
    from app.config import load_config
    from app.engine import checkpoint as ckpt
    from app.engine.loop import train
    from train_throughput import fresh_accelerate_state

    base = ctx.work_path / "resume"
    base.mkdir(parents=True, exist_ok=True)
    ref_out, out = base / "reference", base / "killed"
    for old in (ref_out, out):  # a kept --work folder holds an earlier run's
        shutil.rmtree(old, ignore_errors=True)
    logs = Path(ctx.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    p = ctx.profile
    first = ckpt.step_name(p.resume_save_every)

    res: dict = {"killed_at_checkpoint": None, "steps": p.resume_steps, "save_every": p.resume_save_every}
    proc = start(ctx, command(ctx, model_dir, out), logs / "resume_killed.log")
    killer = threading.Thread(target=kill_after_checkpoint, args=(proc, out, first, res, p.unit_timeout_s))
    killer.start()
    try:
        fresh_accelerate_state()
        t0 = time.perf_counter()
        ref_rc = train(load_config(RECIPE, config_args(run_values(ctx, model_dir, ref_out))))
        res["reference_s"] = round(time.perf_counter() - t0, 2)
    except BaseException:
        proc.kill()  # the reference broke: the run beside it is of no use
        raise
    finally:
        killer.join()
    if ref_rc != 0:
        raise RuntimeError(f"the reference run exited {ref_rc}")
    latest = ckpt.latest(out)
    res["resumed_from_step"] = ckpt.read_json(latest / "trainer_state.json")["step"] if latest else None

    t0 = time.perf_counter()
    log = logs / "resume_rerun.log"
    rerun = subprocess.run(command(ctx, model_dir, out), cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                           env=run_env(ctx), timeout=p.unit_timeout_s)
    res.update(resumed_rc=rerun.returncode, rerun_s=round(time.perf_counter() - t0, 2),
               resumed="resumed from" in log.read_text(errors="replace"))
    if rerun.returncode == 0 and res["killed_at_checkpoint"]:
        res.update(compare(ref_out, out))
    return res


def compare(ref_out: Path, out: Path) -> dict:
    """Final adapter weights and logged per-step losses / lrs of two runs."""
    import torch
    from safetensors.torch import load_file

    from kit import read_metrics

    a = load_file(str(out / "checkpoints" / "final" / "adapter_model.safetensors"))
    b = load_file(str(ref_out / "checkpoints" / "final" / "adapter_model.safetensors"))
    if set(a) != set(b):
        raise RuntimeError(f"adapter tensors differ: {sorted(set(a) ^ set(b))[:4]}")
    diff = torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b))
    norm = torch.sqrt(sum((b[k].double() ** 2).sum() for k in b))
    max_abs = max(float((a[k].double() - b[k].double()).abs().max()) for k in b)
    got, want = read_metrics(out), read_metrics(ref_out)
    steps = sorted(s for s in want if "loss" in want[s])
    rel = [abs(got[s]["loss"] - want[s]["loss"]) / max(abs(want[s]["loss"]), 1e-12) for s in steps if s in got]
    return {"weights_rel_l2": float(diff / norm), "weights_max_abs": max_abs, "adapter_tensors": len(b),
            "steps_logged": sum(1 for s in steps if s in got and "loss" in got[s]),
            "loss_rel_max": max(rel) if rel else float("inf"),
            "lr_equal": all(got.get(s, {}).get("lr") == want[s]["lr"] for s in steps)}
