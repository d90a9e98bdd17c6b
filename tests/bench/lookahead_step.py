"""Training step of the lookahead task: plain MiniGPT, the seed's two-pass step as written, cached, all-position.

    python tests/bench/lookahead_step.py [--batch 32] [--context 128] [--layers 4] [--heads 4] [--dim 128]
                                         [--steps 8] [--skip 2] [--threads 1] [--device cpu|cuda] [--json OUT]

Same model size and batch for every mode (app.tasks.lookahead.model; ConfidenceAwareGPT and the parameter-matched
MiniGPT), AdamW, one optimizer step per batch of `--batch` random byte sequences of `--context` + 2 tokens:

  plain        MiniGPT, LM loss at every position (step.plain_step)
  seed         the seed's step as written: pass 2 recomputes all L + 1 positions (step.seed_step(cached=False))
  cached       the seed's step with pass 2 as one appended token on pass 1's keys/values, no graph (cached=True)
  all_position LM loss at every position + every position's lookahead in one batched appended pass

Step time: forward + backward + optimizer step + zero_grad, median over `--steps` after `--skip` warm-up steps, as
wall time and as the process's CPU time; on a CPU with one thread the ratios use CPU time, which other processes on a
shared machine do not inflate (wall time there swings several-fold with the load).
Peak memory: each mode runs in a fresh process; CPU: peak RSS (ru_maxrss) minus RSS before the first step; CUDA:
max_memory_allocated minus memory allocated before the first step. Prints one line per mode and the ratio to plain.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("plain", "seed", "cached", "all_position")


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(args) -> dict:
    import torch

    from app.tasks.lookahead import step
    from app.tasks.lookahead.model import GPT, shapes

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sh = shapes(257, args.context + 1, args.layers, args.heads, args.dim, 4)
    model = GPT(sh["plain" if args.mode == "plain" else "confidence"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (args.batch, args.context + 2), device=device)
    prev = torch.zeros(args.batch, args.context, device=device)
    L = args.context

    def one():
        nonlocal prev
        if args.mode == "plain":
            out = step.plain_step(model, data)
            loss = out.lm_sum / (args.batch * L)
        elif args.mode in ("seed", "cached"):
            out = step.seed_step(model, data, prev, cached=args.mode == "cached")
            loss = (out.lm_sum + out.confidence_sum) / args.batch
            prev = out.prev_conf
        else:
            out = step.all_position_step(model, data, prev)
            loss = (out.lm_sum + out.confidence_sum) / (args.batch * L)
            prev = out.prev_conf
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kb() * 1024
    times, cpu = [], []
    for i in range(args.skip + args.steps):
        t, c = time.perf_counter(), time.process_time()
        one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.skip:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"mode": args.mode, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "peak_mb": peak / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:] if not a.startswith("--json")]
        if args.json:
            cmd = [c for c in cmd if c != args.json]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    # on a CPU, ratios use CPU time (one thread: not inflated by other processes on a shared machine)
    key = "cpu_s" if args.device == "cpu" and args.threads == 1 else "step_s"
    plain = rows[0][key]
    print(f"batch={args.batch} context={args.context} layers={args.layers} dim={args.dim} device={args.device} "
          f"threads={args.threads}; ratios of {'CPU' if key == 'cpu_s' else 'wall'} time")
    for r in rows:
        r["x_plain"] = r[key] / plain
        print(f"{r['mode']:<13} wall {r['step_s'] * 1000:8.1f} ms  cpu {r['cpu_s'] * 1000:8.1f} ms  "
              f"{r['x_plain']:5.2f}x plain  peak {r['peak_mb']:8.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
