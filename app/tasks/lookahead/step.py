"""The two-pass lookahead training step: the seed's definition, its cached form, the all-position variant, evaluation.

Data are chunks of L + 2 tokens: tokens_t = data[:, :L], tokens_t_plus_1 = data[:, L], tokens_t_plus_2 = data[:, L+1].

The seed's step (`seed_step_reference`, a direct transcription):
  pass 1: logits, confidence_pred = model(tokens_t, confidence_scalars=prev_conf); loss_lm = CE(logits[:, -1],
          tokens_t_plus_1); last_conf_pred = confidence_pred[:, -1]
  pass 2 (no gradient): sample the next token from softmax(logits[:, -1]), append it, append last_conf_pred to the
          confidence inputs, run the model again; future_loss = CE(new last position, tokens_t_plus_2) per example
  loss = loss_lm + alpha * MSE(last_conf_pred, future_loss); prev_conf <- confidence_pred (detached)

`seed_step(..., cached=True)` computes the same numbers with pass 2 as one appended token on pass 1's keys/values
(`GPT.extend`): no recomputation of the L positions, no autograd graph. `all_position_step` supervises every
position: LM loss at all L positions (as the plain model gets) and, in one extra batched pass, the lookahead of every
position at once: position i's sampled token sits at position i + 1 and attends to its own prefix (cache positions
0..i) and itself, with confidence input confidence_pred[:, i]; its loss against data[:, i + 2] is position i's
future loss. `all_position_reference` is the per-position loop it must equal.

Evaluation (`evaluate_batch`, the same for both models): LM cross-entropy at all L positions. The confidence model's
inputs are its own causal predictions: a zero-confidence pass gives confidence_pred, and position i receives the
prediction made at position i - 1 (which saw tokens 0..i-1 only), so no target information can reach the inputs.
`shuffle=True` permutes those inputs across the batch: an honest model's perplexity barely moves.

All step functions return summed losses (the engine divides by the counts of `loss_items`) and the new prev_conf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class StepOut:
    lm_sum: torch.Tensor
    confidence_sum: torch.Tensor | None
    prev_conf: torch.Tensor | None  # what the next step receives (detached)
    sampled: torch.Tensor | None = None  # (B, 1) or (B, L)
    future_loss: torch.Tensor | None = None  # (B,) or (B, L)
    confidence_pred: torch.Tensor | None = None  # the predictions supervised, (B,) or (B, L)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) values in float32 for losses; float32/float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def split(data: torch.Tensor):
    L = data.size(1) - 2
    return data[:, :L], data[:, L], data[:, L + 1]


def fit_prev_conf(prev_conf: torch.Tensor | None, shape, device) -> torch.Tensor:
    """prev_conf for a batch of `shape` (B, L): the carried predictions where they exist, zeros elsewhere."""
    out = torch.zeros(shape, device=device)
    if prev_conf is not None:
        b, n = min(shape[0], prev_conf.size(0)), min(shape[1], prev_conf.size(1))
        out[:b, :n] = prev_conf[:b, :n].to(device)
    return out


# --- the seed's step -----------------------------------------------------------------------------------------------
def seed_step_reference(model, data, prev_conf, alpha: float) -> dict:
    """The seed's training step written out as defined (two full passes); means, as the seed computes them."""
    tokens_t, tokens_t_plus_1, tokens_t_plus_2 = split(data)
    logits, confidence_pred = model(tokens_t, confidence_scalars=prev_conf)
    loss_lm = F.cross_entropy(logits[:, -1], tokens_t_plus_1)
    last_conf_pred = confidence_pred[:, -1]
    with torch.no_grad():
        probs = F.softmax(logits[:, -1], dim=-1)
        sampled = torch.multinomial(probs, 1)
        extended = torch.cat([tokens_t, sampled], dim=1)
        extended_conf = torch.cat([prev_conf, last_conf_pred.unsqueeze(1)], dim=1)
        logits2, _ = model(extended, confidence_scalars=extended_conf)
        future_loss = F.cross_entropy(logits2[:, -1], tokens_t_plus_2, reduction="none")
    loss_conf = F.mse_loss(last_conf_pred, future_loss.detach())
    return {"loss": loss_lm + alpha * loss_conf, "loss_lm": loss_lm, "loss_conf": loss_conf, "sampled": sampled,
            "future_loss": future_loss, "prev_conf": confidence_pred.detach()}


def seed_step(model, data, prev_conf, cached: bool = True) -> StepOut:
    """The seed's step as sums over the batch; pass 2 on pass 1's cache (cached) or recomputed in full."""
    tokens_t, tokens_t_plus_1, tokens_t_plus_2 = split(data)
    L = tokens_t.size(1)
    logits, confidence_pred, cache = model(tokens_t, confidence_scalars=prev_conf, return_cache=True,
                                           last_logits_only=True)  # the seed's LM loss reads the last position only
    lm_sum = F.cross_entropy(logits[:, -1], tokens_t_plus_1, reduction="sum")
    last_conf_pred = confidence_pred[:, -1]
    with torch.no_grad():
        sampled = torch.multinomial(F.softmax(logits[:, -1], dim=-1), 1)
        new_conf = last_conf_pred.detach().unsqueeze(1)
        if cached:
            positions = torch.tensor([L], device=data.device)
            logits2, _ = model.extend(sampled, positions, cache, None, confidence_scalars=new_conf)
        else:
            logits2, _ = model(torch.cat([tokens_t, sampled], 1), confidence_scalars=torch.cat([prev_conf, new_conf], 1))
        future_loss = F.cross_entropy(_wide(logits2[:, -1]), tokens_t_plus_2, reduction="none")
    confidence_sum = ((_wide(last_conf_pred) - future_loss) ** 2).sum()
    return StepOut(lm_sum, confidence_sum, confidence_pred.detach(), sampled, future_loss, last_conf_pred)


# --- every position ------------------------------------------------------------------------------------------------
def lookahead_mask(L: int, device) -> torch.Tensor:
    """(L, 2L) bool: appended token i attends to cache positions 0..i and to itself."""
    cache_part = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return torch.cat([cache_part, torch.eye(L, dtype=torch.bool, device=device)], dim=1)


@torch.no_grad()
def future_losses(model, logits, cache, confidence_pred, data, generator=None):
    """(sampled (B, L), future loss (B, L)): every position's lookahead in one batched appended pass."""
    B, L, V = logits.shape
    probs = F.softmax(_wide(logits.detach()), dim=-1).reshape(B * L, V)
    sampled = torch.multinomial(probs, 1, generator=generator).view(B, L)
    positions = torch.arange(1, L + 1, device=data.device)
    logits2, _ = model.extend(sampled, positions, cache, lookahead_mask(L, data.device),
                              confidence_scalars=confidence_pred.detach())
    future = F.cross_entropy(_wide(logits2).reshape(B * L, V), data[:, 2 : L + 2].reshape(-1), reduction="none")
    return sampled, future.view(B, L)


def all_position_step(model, data, prev_conf) -> StepOut:
    """LM loss at all L positions and the lookahead confidence loss at all L positions (sums)."""
    L = data.size(1) - 2
    tokens, targets = data[:, :L], data[:, 1 : L + 1]
    logits, confidence_pred, cache = model(tokens, confidence_scalars=prev_conf, return_cache=True)
    V = logits.size(-1)
    lm_sum = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum")
    sampled, future = future_losses(model, logits, cache, confidence_pred, data)
    confidence_sum = ((_wide(confidence_pred) - future) ** 2).sum()
    return StepOut(lm_sum, confidence_sum, confidence_pred.detach(), sampled, future, confidence_pred)


@torch.no_grad()
def all_position_reference(model, data, prev_conf, sampled, confidence_pred) -> torch.Tensor:
    """Future losses (B, L) by the definition, one position at a time: for each i, the full model on
    tokens[:, :i+1] + sampled[:, i] with confidence inputs prev_conf[:, :i+1] + confidence_pred[:, i]."""
    L = data.size(1) - 2
    out = torch.zeros(data.size(0), L)
    for i in range(L):
        seq = torch.cat([data[:, : i + 1], sampled[:, i : i + 1]], 1)
        conf = torch.cat([prev_conf[:, : i + 1], confidence_pred[:, i : i + 1]], 1)
        logits, _ = model(seq, confidence_scalars=conf)
        out[:, i] = F.cross_entropy(_wide(logits[:, -1]), data[:, i + 2], reduction="none")
    return out


def plain_step(model, data) -> StepOut:
    """The plain MiniGPT: LM loss at all L positions (targets data[:, 1:L+1]; data[:, L+1] is unused)."""
    L = data.size(1) - 2
    logits, _ = model(data[:, :L])
    lm_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), data[:, 1 : L + 1].reshape(-1), reduction="sum")
    return StepOut(lm_sum, None, None)


# --- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def causal_confidence(model, tokens) -> torch.Tensor:
    """Confidence inputs from the model's own earlier predictions: position i gets the prediction made at i - 1 by a
    zero-confidence pass (position 0 gets 0)."""
    _, pred0 = model(tokens, confidence_scalars=torch.zeros(tokens.shape, device=tokens.device))
    return torch.cat([torch.zeros_like(pred0[:, :1]), pred0[:, :-1]], dim=1)


@torch.no_grad()
def evaluate_batch(model, data, generator=None, shuffle: bool = False) -> dict:
    """ce (B, L) at every position; for the confidence model also pred and future (B, L) (the lookahead with
    `generator`). `shuffle` permutes the confidence inputs across the batch (honesty check)."""
    L = data.size(1) - 2
    tokens, targets = data[:, :L], data[:, 1 : L + 1]
    out = {}
    if model.shape.confidence:
        conf_in = causal_confidence(model, tokens)
        if shuffle:
            where = generator.device if generator is not None else tokens.device
            perm = torch.randperm(tokens.size(0), generator=generator, device=where).to(tokens.device)
            conf_in = conf_in[perm]
        logits, pred, cache = model(tokens, confidence_scalars=conf_in, return_cache=True)
        _, future = future_losses(model, logits, cache, pred, data, generator)
        out.update(pred=_wide(pred), future=future)
    else:
        logits, _ = model(tokens)
    V = logits.size(-1)
    out["ce"] = F.cross_entropy(_wide(logits).reshape(-1, V), targets.reshape(-1), reduction="none").view(targets.shape)
    return out


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    import numpy as np

    def ranks(a):
        a = np.asarray(a, dtype=float)
        order = a.argsort(kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        sorted_a = a[order]
        _, start, counts = np.unique(sorted_a, return_index=True, return_counts=True)
        for s, c in zip(start, counts):
            if c > 1:
                r[order[s : s + c]] = s + (c - 1) / 2
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
