"""Part 4, the confidence-token step at vocabulary 32k and 152k: time and memory against full-logit masked loss.

Each vocabulary runs `tests/bench/confidence_step.worker` (one process per vocabulary when isolating) for its three
setups: `tokens` (the project's ConfidenceTokenLoss, LM head on one gathered row per example), `tokens_pair` (the
same over the domain's two tokens) and `full` (`model(...).logits` over [batch, seq, vocab], shifted, masked
cross-entropy). Model: the bench's Mistral-architecture model with the given hidden size and layers, LoRA r=16 on
all linear projections with trainable token rows, bf16 autocast on CUDA. A step is forward + loss + backward + clip
+ AdamW + zero_grad; step time is the median of the measured steps (device synchronised), memory is
max_memory_allocated during them minus what was allocated before them (activations, logits, gradients).

Correctness: the first loss of `tokens` equals that of `full` (same model, same batch, before any update): both
are the cross-entropy of the same confidence token over the whole vocabulary.
"""

from __future__ import annotations

import argparse
import math

from kit import Context, UnitError, check, free_memory, use_repo_imports

SETUPS = ("tokens", "tokens_pair", "full")


def run(ctx: Context) -> dict:
    figures, checks, notes = {}, [], []
    # bf16 autocast on CUDA: rounding moves the summed loss by ~1e-4 relative, while gathering the wrong row moves it
    # by ~4e-2 (one random logit's spread over 8 rows); fp32 on CPU
    tol = 2e-3 if ctx.profile.cuda else 1e-4
    for vocab in ctx.profile.conf_vocabs:
        key = f"vocab_{vocab // 1000}k"
        if ctx.over_budget("confidence"):
            notes.append(f"{key} skipped: time budget")
            continue
        try:
            res = ctx.unit("part_confidence:vocab_unit", vocab=vocab)
        except UnitError as err:
            checks.append(check(f"confidence step {key} runs", False, str(err)))
            continue
        figures[key] = res
        a, b = res["tokens"]["first_loss"], res["full"]["first_loss"]
        rel = abs(a - b) / max(abs(b), 1e-12)
        finite = all(math.isfinite(res[s]["first_loss"]) for s in SETUPS)
        checks.append(check(f"confidence loss equals full-logit loss ({key})", finite and rel <= tol,
                            f"{a:.5f} vs {b:.5f}, relative {rel:.1e} (limit {tol:g})"))
    return {"figures": figures, "checks": checks, "notes": notes}


def vocab_unit(ctx: Context, vocab: int) -> dict:
    use_repo_imports()
    import torch

    from confidence_step import worker

    shape = ctx.profile.conf_shape
    out = {}
    for setup in SETUPS:
        args = argparse.Namespace(setup=setup, vocab=vocab, device=ctx.device, threads=torch.get_num_threads(),
                                  **shape)
        res = worker(args)
        out[setup] = {"step_ms": round(res["step_s"] * 1000, 2), "peak_delta_mib": round(res["peak_delta_bytes"] / 2**20, 1),
                      "base_mib": round(res["base_bytes"] / 2**20, 1), "first_loss": res["first_loss"]}
        free_memory(ctx.device)
    full = out["full"]
    for setup in ("tokens", "tokens_pair"):
        out[setup]["time_vs_full"] = round(out[setup]["step_ms"] / full["step_ms"], 3)
        if full["peak_delta_mib"] > 0:
            out[setup]["memory_vs_full"] = round(out[setup]["peak_delta_mib"] / full["peak_delta_mib"], 3)
    out["shape"] = {"vocab": vocab, **shape}
    return out
