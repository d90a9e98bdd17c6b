"""Ranking rows and features: the row checks, the model input of a question and its candidates (the shared prefix,
the candidates, what an over-long question loses), the batch, and scoring a list of features with the objective.
Training (task.py) and `ranking rank` / `infer` (predict.py) read rows and score them through this one module.
"""

from __future__ import annotations

import torch

from app.config import Config
from app.data import Feature
from app.errors import UserError


# --- rows ---------------------------------------------------------------------------------------------------------
def check_row(values, where: str, require_rewards: bool = True) -> None:
    if not isinstance(values, dict):
        raise UserError(f"{where}: a row must be a JSON object")
    for key in ("question", "context"):
        if not isinstance(values.get(key), str):
            raise UserError(f"{where}: '{key}' must be a string, found {type(values.get(key)).__name__}")
    if not values["question"].strip():
        raise UserError(f"{where}: 'question' is empty")
    cands = values.get("candidates")
    if not isinstance(cands, list) or len(cands) < 1:
        raise UserError(f"{where}: 'candidates' must be a non-empty list")
    for k, c in enumerate(cands):
        if not (isinstance(c, dict) and isinstance(c.get("text"), str) and c["text"].strip()):
            raise UserError(f"{where}: candidate {k} must be an object with a non-empty 'text'")
    rewards = values.get("rewards")
    if rewards is None and not require_rewards:
        return
    if not isinstance(rewards, list) or len(rewards) != len(cands):
        raise UserError(f"{where}: 'rewards' must be a list of {len(cands)} numbers (one per candidate); "
                        "write them with python -m app ranking rewards")
    for k, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= r <= 1.0):
            raise UserError(f"{where}: reward {k} must be a number in [0, 1], found {r!r}")
    exact = values.get("exact")
    if exact is not None and (not isinstance(exact, list) or len(exact) != len(cands)):
        raise UserError(f"{where}: 'exact' must be a list of {len(cands)} booleans")


def prefix_text(question: str, context: str) -> str:
    return f"Question: {question.strip()}\nContext: {context.strip()}\nCandidate:"


def encode_question(values: dict, tokenizer, max_len: int, overlength: str = "truncate", where: str = "") -> dict | None:
    """{"prefix": ids, "candidates": [ids...], "cut": bool}; None when too long and overlength='drop'."""
    prefix = tokenizer(prefix_text(values["question"], values["context"])).input_ids
    cands = [tokenizer(" " + c["text"].strip(), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
             for c in values["candidates"]]
    longest = max(len(c) for c in cands)
    if len(prefix) + longest <= max_len:
        return {"prefix": prefix, "candidates": cands, "cut": False}
    if overlength == "error":
        raise UserError(f"{where}: {len(prefix) + longest} tokens (question + context + longest candidate) > "
                        f"max_seq_length={max_len} (set overlength='truncate' or 'drop')")
    if overlength == "drop":
        return None
    cap = max(2, max_len // 4)
    cands = [c if len(c) <= cap else c[: cap - 1] + [tokenizer.eos_token_id] for c in cands]
    keep = max_len - max(len(c) for c in cands)
    tail = tokenizer("\nCandidate:", add_special_tokens=False).input_ids
    if keep < len(tail) + 2:
        raise UserError(f"{where}: max_seq_length={max_len} leaves no room for the question")
    body = prefix[: len(prefix) - len(tail)]  # the context loses its end first, then the question (rarely)
    prefix = body[: keep - len(tail)] + tail
    return {"prefix": prefix, "candidates": cands, "cut": True}


def collate_ranking(features: list[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    B = len(features)
    P = max(len(f.input_ids) for f in features)
    K = max(len(f.extra["candidates"]) for f in features)
    S = max(len(c) for f in features for c in f.extra["candidates"])
    prefix_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((B, P), dtype=torch.long)
    cand_ids = torch.full((B, K, S), pad_id, dtype=torch.long)
    cand_mask = torch.zeros((B, K, S), dtype=torch.long)
    cand_valid = torch.zeros((B, K), dtype=torch.bool)
    rewards = torch.zeros((B, K), dtype=torch.float32)
    for i, f in enumerate(features):
        prefix_ids[i, : len(f.input_ids)] = torch.tensor(f.input_ids)
        prefix_mask[i, : len(f.input_ids)] = 1
        for k, c in enumerate(f.extra["candidates"]):
            cand_ids[i, k, : len(c)] = torch.tensor(c)
            cand_mask[i, k, : len(c)] = 1
            cand_valid[i, k] = True
        rw = f.extra.get("rewards")
        if rw is not None:
            rewards[i, : len(rw)] = torch.tensor(rw, dtype=torch.float32)
    return {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "cand_ids": cand_ids, "cand_mask": cand_mask,
            "cand_valid": cand_valid, "rewards": rewards}


def feature_of(values: dict, tokenizer, cfg: Config, line: int = 0, where: str = "", overlength: str | None = None):
    enc = encode_question(values, tokenizer, cfg.max_seq_length, overlength or cfg.overlength, where)
    if enc is None:
        return Feature([tokenizer.bos_token_id or 0], [-100], line, {"candidates": [[0]], "rewards": [0.0],
                                                                      "keep": False})
    return Feature(enc["prefix"], [-100] * len(enc["prefix"]), line,
                   {"candidates": enc["candidates"], "rewards": values.get("rewards"), "cut": enc["cut"], "keep": True})


@torch.no_grad()
def score_features(objective, features: list[Feature], pad_id: int, device, batch_size: int, skip=None):
    """(feature indices, per feature its list of scores), longest prefix first."""
    order = sorted(range(len(features)), key=lambda i: -len(features[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if skip is not None and skip(batch):
            continue
        b = {k: v.to(device) for k, v in collate_ranking([features[i] for i in batch], pad_id).items()}
        out = objective.scores(**b).cpu()
        yield batch, [out[row, : len(features[i].extra["candidates"])].tolist() for row, i in enumerate(batch)]
