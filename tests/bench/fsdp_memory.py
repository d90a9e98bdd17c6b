"""Memory per process and step time of full fine-tuning: DDP against FSDP2 (`parallelism='fsdp'`), 2 CPU processes.

    python tests/bench/fsdp_memory.py [--hidden 768] [--layers 12] [--steps 12] [--no-checkpointing] [--json OUT]

One model for both: a Mistral-architecture model built by `app.lm.tiny.build_model` (random weights, `--hidden` x
`--layers`, the in-repo tokenizer), saved once as an ordinary model directory. Each setup is the real command,
`torchrun --nproc_per_node=2 -m app train configs/tiny.py --finetuning=full ...` (gloo, one thread per process),
same data, micro batch, global batch and steps, activation checkpointing on (as full fine-tuning of a large model
runs; it also keeps the activations, which sharding does not split, from hiding the state); only `--parallelism`
differs.

Memory: the parent samples every worker's resident set (VmRSS in /proc/PID/status) every 10 ms while the workers
train (with MALLOC_MMAP_THRESHOLD_=131072 on both, so that glibc returns a freed tensor to the system at once and the
resident set follows live memory, as a GPU's allocator statistics would), and stops counting a run when its final
checkpoint starts (the .tmp-final directory appears): the figure is the training state (parameters + gradients +
optimizer state + activations), not the save. The same two-process command on the embedded tiny model (under 1 MB
of parameters) gives the baseline every process carries (Python, torch, transformers, gloo, data);
`state = peak - baseline` per process, and the ratio FSDP/DDP is taken on that.
Ideal: 0.5 (each process holds half of everything); DDP also keeps gradient buckets (one more copy of the
gradients).

Step time: the median of the run's logged tokens_per_s windows after the first (`log_every=2`), as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.pipelines.serve import free_port  # noqa: E402


def write_model(out: Path, hidden: int, layers: int) -> Path:
    from app.lm.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), hidden_size=hidden, layers=layers)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out



def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def workers(parent: int) -> list[int]:
    """The training processes: torchrun's children."""
    try:
        return [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    except OSError:
        return []


def run(model: Path, out: Path, parallelism: str, steps: int, checkpointing: bool) -> dict:
    args = {"model_name": str(model), "create_tiny_model": False, "out_dir": str(out), "finetuning": "full",
            "train_file": str(ROOT / "data/sample/train.csv"), "dev_file": None, "tensorboard": False,
            "max_steps": steps, "batch_size": 8, "micro_batch_size": 4, "save_every": 10_000, "log_every": 2,
            "max_seq_length": 256, "learning_rate": 1e-4, "warmup_steps": 2, "parallelism": parallelism,
            "share_prompt_prefix": False, "gradient_checkpointing": checkpointing}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "app", "train", "configs/tiny.py",
           *[f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in args.items()]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
    peaks: dict[int, int] = {}
    saving = out / "checkpoints" / ".tmp-final"
    while proc.poll() is None and not saving.exists():
        for pid in workers(proc.pid):
            peaks[pid] = max(peaks.get(pid, 0), rss_kb(pid))
        time.sleep(0.01)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{parallelism} run failed:\n{err[-3000:]}")
    tps = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if "tokens_per_s" in line]
    return {"peak_mb": [v / 1024 for v in peaks.values()], "tokens_per_s": statistics.median(tps[1:] or tps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fsdp-bench-") as tmp:
        tmp = Path(tmp)
        from app.lm.tiny import write_tiny_model

        tiny = write_tiny_model(tmp / "tiny")
        big = write_model(tmp / "model", a.hidden, a.layers)
        n_params = sum(os.path.getsize(p) for p in big.glob("*.safetensors")) / 4  # float32
        print(f"model: hidden {a.hidden}, {a.layers} layers, {n_params / 1e6:.1f}M parameters "
              f"({n_params * 4 / 2**20:.0f} MB float32); load average {os.getloadavg()[0]:.2f}")
        base = run(tiny, tmp / "base", "ddp", 4, a.checkpointing)
        baseline = max(base["peak_mb"])
        results = {"baseline_mb": baseline, "parameters_m": n_params / 1e6}
        for parallelism in ("ddp", "fsdp"):
            r = run(big, tmp / parallelism, parallelism, a.steps, a.checkpointing)
            r["state_mb"] = [p - baseline for p in r["peak_mb"]]
            results[parallelism] = r
            print(f"{parallelism:5s} peak RSS per process {', '.join(f'{p:,.0f}' for p in r['peak_mb'])} MB; "
                  f"state {', '.join(f'{s:,.0f}' for s in r['state_mb'])} MB; {r['tokens_per_s']:,.0f} tokens/s")
        ddp, fsdp = results["ddp"], results["fsdp"]
        results["state_ratio"] = max(fsdp["state_mb"]) / max(ddp["state_mb"])
        results["step_time_ratio"] = ddp["tokens_per_s"] / fsdp["tokens_per_s"]
        print(f"baseline (tiny model) {baseline:,.0f} MB per process")
        print(f"FSDP / DDP per-process state: {results['state_ratio']:.2f}x (target <= 0.6, ideal 0.5); "
              f"step time: {results['step_time_ratio']:.2f}x (target <= 1.5)")
        if a.json:
            a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
