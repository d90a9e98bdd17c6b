"""Training step of the confidence head: hidden states at the markers only, against the naive full forward.

    python tests/bench/confidence_head_step.py [--batch 4] [--seq 1024] [--vocab 32000] [--hidden 96] [--layers 2]
                                               [--marker-every 64] [--steps 6] [--skip 2] [--threads 1]
                                               [--device cpu|cuda] [--lora] [--json OUT]

Both paths train the same model with the same head and optimizer: the embedded tiny Mistral-architecture model
(`app.lm.tiny.build_model`) with a 32k vocabulary (untied LM head), fp32, SDPA attention, full fine-tuning (`--lora`:
LoRA on q,k,v,o with the marker row trainable), the MLP head of `app.tasks.confidence_head.task` (1024, 256, dropout 0.1),
AdamW, one optimizer step per batch of `--batch` random sequences of `--seq` tokens with a marker every
`--marker-every` tokens (16 steps per sequence by default) and random targets in [0, 1]; MSE summed over markers.

  head   this task's objective: `app.lm.last_hidden_states` (the decoder body, no LM head), then the marker rows
         go through the head
  naive  `model(input_ids, attention_mask, output_hidden_states=True)`: the full causal-LM forward, logits over the
         whole vocabulary at every position included, then `hidden_states[-1]` gathered at the markers

Before timing, both paths score one batch and must agree (the last entry of `hidden_states` is the final-norm
output that `last_hidden_states` returns).

Step time: wall time of forward + backward + optimizer step + zero_grad, median over `--steps` steps after `--skip`
warm-up steps. One torch thread by default: on a small shared CPU a second thread mostly adds contention (steps were
4-10x slower and erratic with 2 threads on a loaded 2-core machine); `--threads 0` keeps torch's default.

Peak memory. Each path runs in a fresh Python process of its own, so one path's allocations never hide the other's.
CPU: the process's peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's high-water mark of the
RSS, which also catches short-lived peaks such as the logits tensor) minus its RSS just before the first step (model,
batch and head already built); optimizer state allocated in the first step counts, alike on both sides. CUDA:
`torch.cuda.max_memory_allocated()` minus the memory allocated before the first step.

Not collected by pytest (tests/bench is excluded in pyproject.toml).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def build(args, device):
    import torch

    from app.config import make_config
    from app.tasks.confidence_head.task import ConfidenceHead
    from app.lm.tiny import build_model

    torch.manual_seed(0)
    model = build_model(vocab_size=args.vocab, hidden_size=args.hidden, layers=args.layers)
    model.config._attn_implementation = "sdpa"
    marker = args.vocab - 1
    cfg = make_config(task="confidence_head", finetuning="lora" if args.lora else "full", lora_dropout=0.1)
    if args.lora:
        from app.lm.modeling import add_adapters

        model = add_adapters(model, cfg, [marker])
    model.to(device)
    task = ConfidenceHead()
    objective = task.objective(model, None, cfg).to(device)  # its objective reads no tokenizer
    objective.train()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, args.vocab - 1, (args.batch, args.seq), generator=g)
    ids[:, args.marker_every - 1 :: args.marker_every] = marker
    slots = args.seq // args.marker_every
    positions = torch.arange(args.marker_every - 1, args.seq, args.marker_every).repeat(args.batch, 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "positions": positions,
             "step_mask": torch.ones(args.batch, slots, dtype=torch.bool),
             "targets": torch.rand(args.batch, slots, generator=g),
             "target_mask": torch.ones(args.batch, slots, dtype=torch.bool)}
    return objective, {k: v.to(device) for k, v in batch.items()}


def naive_marker_scores(objective, input_ids, attention_mask, positions, step_mask):
    """The straightforward way: full causal-LM forward (logits included), then gather the last hidden states."""
    if objective.head.training != objective.model.training:
        objective.head.train(objective.model.training)
    out = objective.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          use_cache=False)
    hidden = out.hidden_states[-1]
    rows, slots = step_mask.nonzero(as_tuple=True)
    return objective.head(hidden[rows, positions[rows, slots]].to(objective.head.net[0].weight.dtype)).float()


def use_naive(objective) -> None:
    objective.marker_scores = lambda *a: naive_marker_scores(objective, *a)


def check_same_scores(args) -> float:
    """Both paths give the same scores (eval mode, one short batch)."""
    import torch

    small = argparse.Namespace(**{**vars(args), "seq": min(args.seq, 256), "batch": 2})
    objective, batch = build(small, torch.device("cpu"))
    objective.eval()
    keys = ("input_ids", "attention_mask", "positions", "step_mask")
    with torch.no_grad():
        fast = objective.marker_scores(*(batch[k] for k in keys))
        use_naive(objective)
        slow = objective.marker_scores(*(batch[k] for k in keys))
    return float((fast - slow).abs().max())


def worker(args) -> dict:
    import resource

    import psutil
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    objective, batch = build(args, device)
    if args.path == "naive":
        use_naive(objective)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    items = int(batch["target_mask"].sum())

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.skip + args.steps):
        t = time.perf_counter()
        loss = objective(**batch) / items
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        note = "torch.cuda.max_memory_allocated - allocated before step 1"
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = maxrss - base
        note = "ru_maxrss - RSS before step 1" + (" (an earlier peak may hide part)" if maxrss_before > maxrss else "")
    step = statistics.median(times[args.skip :])
    return {"path": args.path, "step_s": step, "samples_per_s": args.batch / step, "peak_bytes": peak,
            "times": times, "threads": torch.get_num_threads(), "memory": note}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--marker-every", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--path", choices=["head", "naive"], help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.path:
        print(json.dumps(worker(args)))
        return 0

    diff = check_same_scores(args)
    print(f"max |score difference| between the paths on one batch: {diff:.2e}")
    if diff > 1e-5:
        print("error: the paths disagree", file=sys.stderr)
        return 1
    results = {}
    for path in ("head", "naive"):
        cmd = [sys.executable, __file__, "--path", path] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    head, naive = results["head"], results["naive"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    mode = "LoRA" if args.lora else "full fine-tuning"
    print(f"model: tiny Mistral, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {mode}, "
          f"{args.device} ({head['threads']} threads, load average {load:.1f})")
    print(f"batch {args.batch} x {args.seq} tokens, a marker every {args.marker_every} tokens; median of "
          f"{args.steps} steps after {args.skip} warm-up")
    print(f"{'path':<8}{'step (s)':>10}{'samples/s':>11}{'peak MiB':>10}")
    for r in (head, naive):
        print(f"{r['path']:<8}{r['step_s']:>10.3f}{r['samples_per_s']:>11.2f}{r['peak_bytes'] / 2**20:>10.0f}")
    print(f"naive / head: step time x{naive['step_s'] / head['step_s']:.2f}, "
          f"peak memory x{naive['peak_bytes'] / max(head['peak_bytes'], 1):.2f}  (peak memory: {head['memory']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "score_diff": diff}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
