"""Part 5, resume on CUDA: a training run killed after a checkpoint and re-run ends where an uninterrupted one does.

As tests/test_resume.py does on CPU: `python -m app train configs/default.py --key=value ...` (the NLI recipe, bf16
LoRA on CUDA, dropout on so the RNG state matters) is started, SIGKILLed once its first step checkpoint exists, and
started again with the same command. An uninterrupted run of the same config is the reference (in this process), and
a second uninterrupted run (beside the first, in its own process) measures the noise floor: how far two runs that
should be equal land apart on this machine. Compared with the reference: the final adapter weights (relative L2
distance; max abs difference as a figure) and every step's logged loss and learning rate.

Tolerance. CUDA kernels are not bitwise deterministic (atomics in attention backward, split-K matmuls) and bf16
rounds those differences up, so exact equality cannot be asked for there; a fixed loose tolerance would not do
either: a resume that loses the RNG state (other dropout masks from the checkpoint on) lands only 9e-3 (relative L2)
from the reference (measured with the smoke's model over 30 steps). So the resumed run must be within max(4 x noise floor, 1e-4) of the reference,
and never beyond 1e-2 (bf16); on CPU (deterministic, the same thread count in every run) within 1e-5. Losses: the
same rule with the floor of the losses. Learning rates must match exactly (a second warmup would show there).
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

BF16_LIMIT = 1e-2


def limit(ctx: Context, floor: float) -> float:
    """How far the resumed run may land from the reference, given the distance between two uninterrupted runs."""
    if not ctx.profile.cuda:
        return 1e-5
    return min(BF16_LIMIT, max(4 * floor, 1e-4))


def run(ctx: Context) -> dict:
    model_dir = ensure_model(ctx, "resume")
    try:
        res = ctx.unit("part_resume:resume_unit", model_dir=model_dir)
    except UnitError as err:
        return {"figures": {}, "checks": [check("resume runs", False, str(err))], "notes": []}
    checks = [
        check("killed after a checkpoint", res["killed_at_checkpoint"] is not None and not res["killed_run_finished"],
              f"SIGKILL with step {res['killed_at_checkpoint']} on disk" if res["killed_at_checkpoint"] else
              "the run ended before a checkpoint appeared"),
        check("re-run resumed", res["resumed"] and res["resumed_rc"] == 0,
              f"exit {res['resumed_rc']}, {'resumed from a checkpoint' if res['resumed'] else 'did not resume'}"),
        check("repeat run finished", res["repeat_rc"] == 0, f"exit {res['repeat_rc']}"),
    ]
    resumed, floor = res.get("resumed_vs_reference"), res.get("repeat_vs_reference")
    if resumed and floor:
        w_lim, l_lim = limit(ctx, floor["weights_rel_l2"]), limit(ctx, floor["loss_rel_max"])
        res["limits"] = {"weights_rel_l2": w_lim, "loss_rel_max": l_lim}
        checks += [
            check("weights equal after resume", resumed["weights_rel_l2"] <= w_lim,
                  f"relative L2 {resumed['weights_rel_l2']:.2e} (max abs {resumed['weights_max_abs']:.2e}); two "
                  f"uninterrupted runs {floor['weights_rel_l2']:.2e}; limit {w_lim:.1e}"),
            check("losses equal after resume",
                  resumed["loss_rel_max"] <= l_lim and resumed["steps_logged"] == res["steps"],
                  f"{resumed['steps_logged']}/{res['steps']} steps logged, max relative difference "
                  f"{resumed['loss_rel_max']:.2e}; two uninterrupted runs {floor['loss_rel_max']:.2e}; "
                  f"limit {l_lim:.1e}"),
            check("learning rates equal after resume", resumed["lr_equal"], "every step's lr as the reference's"),
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
    import torch

    from app.config import load_config
    from app import checkpoint as ckpt
    from app.train import train
    from train_throughput import fresh_accelerate_state

    base = ctx.work_path / "resume"
    ref_out, out, repeat_out = base / "reference", base / "killed", base / "repeat"
    for old in (ref_out, out, repeat_out):  # a kept --work folder holds an earlier run's
        shutil.rmtree(old, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    logs = Path(ctx.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    p = ctx.profile

    res: dict = {"killed_at_checkpoint": None, "steps": p.resume_steps, "save_every": p.resume_save_every}
    proc = start(ctx, command(ctx, model_dir, out), logs / "resume_killed.log")
    repeat = start(ctx, command(ctx, model_dir, repeat_out), logs / "resume_repeat.log")
    killer = threading.Thread(target=kill_after_checkpoint,
                              args=(proc, out, ckpt.step_name(p.resume_save_every), res, p.unit_timeout_s))
    killer.start()
    threads = torch.get_num_threads()
    if not p.cuda:  # CPU kernels reduce in an order that depends on the thread count: the runs' one, as theirs
        torch.set_num_threads(int(run_env(ctx)["OMP_NUM_THREADS"]))
    try:
        fresh_accelerate_state()
        t0 = time.perf_counter()
        ref_rc = train(load_config(RECIPE, config_args(run_values(ctx, model_dir, ref_out))))
        res["reference_s"] = round(time.perf_counter() - t0, 2)
        res["repeat_rc"] = repeat.wait(timeout=p.unit_timeout_s)
    except BaseException:
        proc.kill()  # the reference broke: the runs beside it are of no use
        repeat.kill()
        raise
    finally:
        torch.set_num_threads(threads)
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
        res["resumed_vs_reference"] = compare(ref_out, out)
    if res["repeat_rc"] == 0:
        res["repeat_vs_reference"] = compare(ref_out, repeat_out)
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
