"""Training step of the ranking task: the shared question prefix against the flattened B x 8 forward.

    python tests/bench/ranking_step.py [--questions 2] [--candidates 8] [--max-seq 1024] [--hidden 256] [--layers 4]
                                       [--steps 4] [--skip 1] [--threads 1] [--device cpu|cuda] [--lora] [--json OUT]

Inputs are FinQA-length: the records of ../shared/fixtures/finqa/train_sample.json go through the task's own
pipeline (prepare with the full context, 8 candidates each, rewards) and are tokenized with the real Mistral
tokenizer (../shared/fixtures/tokenizer/mistral-7b-instruct-v0.2) exactly as training does (`feature_of`): contexts
of several hundred tokens, candidates (program = answer) of 10-40 tokens. A batch is `--questions` questions with all
their candidates, the longest contexts first (capped at `--max-seq` with overlength='truncate').

Model: the tiny Mistral architecture of `app.lm.tiny.build_model` with the tokenizer's 32k vocabulary, `--hidden`
and `--layers` (default 256 x 4, so the transformer, not the fixed cost of the embedding matrix, dominates), fp32,
SDPA, full fine-tuning (`--lora`: LoRA r=16 on q,k,v,o), the task's 2-layer score head (1024 wide), cross-entropy
loss, AdamW.

  shared   `share_question_prefix=True`: each question's prefix runs once, the candidates attend to its cached
           keys/values (`RankingObjective._pooled_shared`)
  flat     `share_question_prefix=False`: every candidate is its own prefix + candidate sequence (B x 8 rows)

Before timing, both paths score the batch in eval mode and must agree to 1e-5 (and their gradients are compared).
Step time: wall time of forward + backward + optimizer step + zero_grad, median over `--steps` after `--skip`
warm-up steps. Peak memory of a step: each path runs in a fresh process, after one step on a one-question batch (so
weights, gradients and optimizer state already exist on both sides alike). CPU: the heap in use (glibc mallinfo2:
arena bytes in use + mmapped blocks, where torch's large tensors live) sampled at the end of the forward pass and at
every saved activation the backward pass unpacks, minus the heap in use before the step; the RSS high-water mark is
no use here, since freed memory stays mapped and fragments across steps. CUDA: torch.cuda.max_memory_allocated over
the timed steps minus what is allocated before them.

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
FIXTURES = ROOT.parent / "shared" / "fixtures"


def features(args):
    """Tokenized FinQA questions with their candidate pools, longest first, and the tokenizer."""
    from transformers import AutoTokenizer

    from app.config import make_config
    from app.tasks.ranking.candidates import add_candidates
    from app.tasks.ranking.finqa import prepare_records
    from app.tasks.ranking.rewards import add_rewards
    from app.tasks.ranking.task import feature_of

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer" / "mistral-7b-instruct-v0.2"))
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    cfg = make_config(task="ranking", max_seq_length=args.max_seq, overlength="truncate",
                      num_candidates=args.candidates)
    rows, _ = prepare_records(FIXTURES / "finqa" / "train_sample.json")
    rows = add_rewards(add_candidates(rows, cfg), cfg)
    feats = [feature_of(r, tok, cfg) for r in rows]
    feats.sort(key=lambda f: -len(f.input_ids))
    return feats, tok, cfg


def build(args, device, n_questions=None):
    import torch

    from app.config import make_config
    from app.lm.tiny import build_model
    from app.tasks.ranking.model import build_objective
    from app.tasks.ranking.task import collate_ranking

    feats, tok, _ = features(args)
    torch.manual_seed(0)
    model = build_model(vocab_size=len(tok), hidden_size=args.hidden, layers=args.layers)
    model.config._attn_implementation = "sdpa"
    cfg = make_config(task="ranking", finetuning="lora" if args.lora else "full", lora_r=16, lora_alpha=32,
                      lora_dropout=0.0, rank_head_dropout=0.0, share_question_prefix=args.path != "flat")
    if args.lora:
        from app.lm.modeling import add_adapters

        model = add_adapters(model, cfg)
    model.to(device)
    objective = build_objective(model, cfg, tok.pad_token_id).to(device)
    objective.train()
    chosen = feats[: n_questions or args.questions]
    batch = {k: v.to(device) for k, v in collate_ranking(chosen, tok.pad_token_id).items()}
    info = {"prefix_tokens": [len(f.input_ids) for f in chosen],
            "candidate_tokens": [len(c) for f in chosen for c in f.extra["candidates"]]}
    return objective, batch, info


def check_same(args) -> dict:
    """Scores (eval mode) and gradients of the two paths on the benchmark batch."""
    import torch

    from app.tasks.ranking.model import listwise_loss

    objective, batch, _ = build(argparse.Namespace(**{**vars(args), "path": "shared"}), torch.device("cpu"))
    objective.eval()
    out = {}
    for shared in (True, False):
        objective.zero_grad()
        s = objective.candidate_scores(batch["prefix_ids"], batch["prefix_mask"], batch["cand_ids"],
                                       batch["cand_mask"], batch["cand_valid"], shared=shared)
        listwise_loss(s, batch["rewards"], batch["cand_valid"]).backward()
        out[shared] = (s.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None})
    valid = batch["cand_valid"]
    score_diff = float((out[True][0][valid] - out[False][0][valid]).abs().max())
    scale = max(float(g.abs().max()) for g in out[False][1].values())
    grad_diff = max(float((g - out[False][1][n]).abs().max()) for n, g in out[True][1].items()) / scale
    return {"score_diff": score_diff, "grad_rel_diff": grad_diff}


def heap_in_use() -> int:
    """Bytes of the C heap in use (glibc mallinfo2: uordblks + hblkhd)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    objective, batch, info = build(args, device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    cuda = device.type == "cuda"
    samples = []

    def sample(t):
        samples.append(heap_in_use())
        return t

    def step(b):
        if cuda:
            loss = objective(**b) / b["prefix_ids"].shape[0]
            loss.backward()
        else:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, sample):
                loss = objective(**b) / b["prefix_ids"].shape[0]
                samples.append(heap_in_use())
                loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    # one step on a one-question, two-candidate batch: gradients and optimizer state exist before measuring
    small = {k: v[:1] for k, v in batch.items()}
    small = {**small, "cand_valid": small["cand_valid"].clone()}
    small["cand_valid"][:, 2:] = False
    step(small)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, peak = [], 0
    for _ in range(args.skip + args.steps):
        samples.clear()
        before = heap_in_use()
        t = time.perf_counter()
        step(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if not cuda:
            peak = max(peak, max(samples) - before)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    s = statistics.median(times[args.skip :])
    return {"path": args.path, "step_s": s, "questions_per_s": args.questions / s, "peak_bytes": peak,
            "times": times, "threads": torch.get_num_threads(), **info}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--max-seq", dest="max_seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--skip", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--path", choices=["shared", "flat"], help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.path:
        print(json.dumps(worker(args)))
        return 0

    same = check_same(args)
    print(f"max |score difference| shared vs flat: {same['score_diff']:.2e}; "
          f"max gradient difference / largest gradient: {same['grad_rel_diff']:.2e}")
    if same["score_diff"] > 1e-5:
        print("error: the paths disagree", file=sys.stderr)
        return 1
    results = {}
    for path in ("shared", "flat"):
        cmd = [sys.executable, __file__, "--path", path] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    shared, flat = results["shared"], results["flat"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    pt, ct = shared["prefix_tokens"], shared["candidate_tokens"]
    print(f"model: tiny Mistral, vocab 32000, hidden {args.hidden}, {args.layers} layers, "
          f"{'LoRA r=16' if args.lora else 'full fine-tuning'}, {args.device} ({shared['threads']} threads, "
          f"load average {load:.1f})")
    print(f"batch: {args.questions} questions x {args.candidates} candidates; prefix tokens {pt}; candidate tokens "
          f"{min(ct)}-{max(ct)} (mean {sum(ct) / len(ct):.0f}); rows of tokens: shared {sum(pt) + sum(ct)}, "
          f"flat {sum(pt) * args.candidates + sum(ct)}")
    print(f"{'path':<8}{'step (s)':>10}{'questions/s':>13}{'peak MiB':>10}")
    for r in (shared, flat):
        print(f"{r['path']:<8}{r['step_s']:>10.3f}{r['questions_per_s']:>13.2f}{r['peak_bytes'] / 2**20:>10.0f}")
    speed = flat["step_s"] / shared["step_s"]
    mem = shared["peak_bytes"] / max(flat["peak_bytes"], 1)
    print(f"shared prefix: {speed:.2f}x faster, {mem:.2f}x the peak memory (target: >= 4x, <= 0.4x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"same": same, "results": results, "speedup": speed,
                                               "memory_ratio": mem, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
