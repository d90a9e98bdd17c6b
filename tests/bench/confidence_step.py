"""One training step of the confidence-token loss against full-logit masked cross-entropy.

    python tests/bench/confidence_step.py [--vocab 32000] [--seq 512] [--batch 8] [--hidden 256] [--layers 2]
                                          [--steps 5] [--repeats 3] [--threads 1] [--device cpu|cuda] [--json OUT]

Model: the embedded tiny Mistral-architecture model (`app.lm.tiny.build_model`) with a 32k vocabulary (the size of the
real Mistral tokenizer) plus the four confidence tokens, fp32 on CPU (bf16 autocast on CUDA), LoRA as the recipe
(r=16, alpha=32, all linear projections) with the token rows trainable in the input embeddings and the LM head
(`app.lm.modeling.add_adapters(..., head_rows=True)`), AdamW. Batch: `--batch` random sequences of `--seq` tokens, each ending in
a confidence token that is the only target (labels -100 elsewhere).

  tokens      `ConfidenceTokenLoss(model, "full_vocab")`: the decoder's hidden states, one gathered row per example,
              the LM head on those rows only, cross-entropy over the vocabulary
  tokens_pair the same with cross-entropy over the domain's two tokens
  full        what a generic completion-only SFT loss does: `model(...).logits` ([batch, seq, vocab]), shifted,
              cross-entropy with ignore_index=-100 (float32 upcast of the logits, as transformers' loss does)

A step is forward + loss + backward + clip + AdamW step + zero_grad. Each measurement runs in a fresh process
(`--worker`): build the model and the batch, 2 warm-up steps, then `--steps` measured steps. Time and memory are
measured in separate processes. Step time: the median of the steps, the default allocator; the setups are
interleaved `--repeats` times and the table shows the median over repeats. Peak memory (one process per setup; it
does not vary between runs) on CPU is the resident set: the kernel's high-water mark (VmHWM in /proc/self/status) is reset
after the warm-up (`echo 5 > /proc/self/clear_refs`) and read after the timed steps; the figure is that peak minus
the resident set just before the measured steps, i.e. what a step adds on top of the model, optimizer state and batch
(activations, logits, gradients). The memory workers run with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0 so
that glibc hands freed memory back and the resident set follows live memory (without it, memory freed by the
warm-up steps stays resident, inflates the baseline and hides part of each step's peak). On CUDA it is torch.cuda.max_memory_allocated() minus memory_allocated() before
the measured steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SETUPS = ("tokens", "tokens_pair", "full")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from app.config import make_config
    from app.tasks.confidence_tokens.loss import ConfidenceTokenLoss
    from app.lm.modeling import add_adapters
    from app.lm.tiny import build_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab = args.vocab + 4
    model = build_model(vocab_size=vocab, hidden_size=args.hidden, layers=args.layers, seed=0)
    token_ids = list(range(args.vocab, vocab))
    cfg = make_config(task="confidence_tokens", finetuning="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = add_adapters(model, cfg, token_ids, head_rows=True).to(device)
    model.train()

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, args.vocab, (args.batch, args.seq), generator=gen)
    pair = torch.tensor([token_ids[:2]] * args.batch)
    target = pair[torch.arange(args.batch), torch.randint(0, 2, (args.batch,), generator=gen)]
    ids[:, -1] = target
    labels = torch.full_like(ids, -100)
    labels[:, -1] = target
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "conf_index": torch.full((args.batch,), args.seq - 1), "pair": pair}
    batch = {k: v.to(device) for k, v in batch.items()}

    if args.setup == "full":
        def loss_fn():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), batch["labels"][:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")
    else:
        objective = ConfidenceTokenLoss(model, "pair" if args.setup == "tokens_pair" else "full_vocab")

        def loss_fn():
            return objective(**batch)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step() for _ in range(2)]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kb("VmHWM") * 1024
    return {"setup": args.setup, "step_s": statistics.median(times), "peak_delta_bytes": peak - base,
            "base_bytes": base, "first_loss": losses[0]}


def run_worker(setup: str, args, measure: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--setup", setup]
    for name in ("vocab", "seq", "batch", "hidden", "layers", "steps", "threads", "device"):
        cmd += [f"--{name}", str(getattr(args, name))]
    # glibc: every allocation over 64 KiB is its own mapping, returned on free, and freed heap is trimmed, so the
    # resident set follows live memory instead of keeping what earlier steps freed
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if measure == "memory":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {setup} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--json", dest="json_out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    setups = args.setups.split(",")
    memory = {}
    for s in setups:
        memory[s] = run_worker(s, args, "memory")
        print(f"memory {s:<12} peak +{memory[s]['peak_delta_bytes'] / 2**20:8.1f} MiB", file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in setups}
    for r in range(args.repeats):
        for s in setups:
            runs[s].append(run_worker(s, args, "time"))
            print(f"repeat {r + 1} {s:<12} step {runs[s][-1]['step_s'] * 1000:8.1f} ms", file=sys.stderr, flush=True)
    summary = {s: {"step_s": statistics.median(x["step_s"] for x in v),
                   "peak_delta_bytes": memory[s]["peak_delta_bytes"], "base_bytes": memory[s]["base_bytes"]}
               for s, v in runs.items()}
    ref = summary.get("full")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    how = "CUDA max_memory_allocated" if args.device == "cuda" else "resident set high-water mark (VmHWM)"
    print(f"model: tiny Mistral, vocab {args.vocab}+4, hidden {args.hidden}, {args.layers} layers, LoRA r=16 all "
          f"linear; batch {args.batch} x seq {args.seq}; {args.device}, {args.threads} thread(s); load avg {load:.1f}")
    print(f"peak memory: {how}, peak during {args.steps} steps minus the footprint before them; "
          f"step time: median of {args.repeats} runs")
    print(f"{'setup':<12} {'step ms':>9} {'peak +MiB':>10} {'time ratio':>11} {'memory ratio':>13}")
    for s, v in summary.items():
        tr = v["step_s"] / ref["step_s"] if ref else float("nan")
        mr = v["peak_delta_bytes"] / ref["peak_delta_bytes"] if ref else float("nan")
        print(f"{s:<12} {v['step_s'] * 1000:9.1f} {v['peak_delta_bytes'] / 2**20:10.1f} {tr:11.3f} {mr:13.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "memory": memory, "runs": runs,
                                                   "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
