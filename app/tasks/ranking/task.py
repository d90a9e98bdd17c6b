"""Candidate ranking (FinQA): a decoder backbone reads question + context + candidate, a score head scores each.

Rows (JSONL, as `python -m app ranking rewards` writes them, or the bundled synthetic set):
    {"id": ..., "question": str, "context": str, "candidates": [{"text": str, ...}, ...], "rewards": [float, ...],
     "exact": [bool, ...] (optional), "gold_answer": ... (optional)}

Model input per candidate: `<bos>Question: {question}\nContext: {context}\nCandidate:` (the prefix, shared by all
candidates of a question) then ` {candidate text}<eos>`. The score is the MLP head on the hidden state at the EOS
(app/tasks/ranking/model.py). Loss: `rank_loss` over the candidates of each question, summed; the engine divides by
the questions of the global batch (one loss item per question).

Too long (prefix + longest candidate > max_seq_length): `overlength` = error (one line naming the row), drop, or
truncate (the context loses its end; the question and every candidate stay whole; candidates are cut to a quarter of
max_seq_length first).

Checkpoint: the engine's weights (adapter or full model) + `score_head.safetensors` (strict key check on load).
Best checkpoints: `best` by metric_for_best (default accuracy) and `best_reward_ratio`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from app.config import Config
from app.data import Row
from app.errors import UserError
from app.tasks.protocol import EvalContext, Feature, Task

log = logging.getLogger(__name__)


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


# --- the task -----------------------------------------------------------------------------------------------------
class Ranking(Task):
    name = "ranking"

    def objective(self, model, cfg: Config) -> nn.Module:
        from app.tasks.ranking.model import build_objective

        return build_objective(model, cfg, self._pad_id)

    _pad_id = 0

    def fsdp_overrides(self, cfg: Config) -> dict:
        # the question prefix's keys/values carry the candidates' gradients back: one forward per block under FSDP2
        return {**super().fsdp_overrides(cfg), **({"share_question_prefix": False} if cfg.share_question_prefix else {})}

    def load_model(self, cfg: Config, device, weights_dir=None):
        model, tokenizer = super().load_model(cfg, device, weights_dir)
        self._pad_id = tokenizer.pad_token_id
        return model, tokenizer

    def save_extra(self, objective: nn.Module, directory: Path, cfg: Config) -> None:
        from app.tasks.ranking.model import save_head

        save_head(objective.head, directory, cfg)

    def load_extra(self, objective: nn.Module, directory: Path) -> None:
        from app.tasks.ranking.model import load_head

        load_head(objective.head, directory)

    def best_checkpoints(self, cfg: Config) -> dict[str, tuple[str, str]]:
        from app.tasks.ranking.config import METRICS

        metric = cfg.metric_for_best or "accuracy"
        return {"best": (metric, METRICS.get(metric, "max")), "best_reward_ratio": ("reward_ratio", "max")}

    # data
    def load_rows(self, cfg: Config, split: str) -> list[Row]:
        from app.data import read_rows

        path = cfg.train_file if split == "train" else cfg.dev_file
        if path is None:
            return []
        rows = read_rows(path)
        for r in rows:
            check_row(r.values, f"{path}:{r.line}")
            r.values["_file"] = str(path)  # for messages at encoding time
        return rows

    def encode(self, row: Row, tokenizer, cfg: Config) -> Feature:
        where = f"{row.values.get('_file', cfg.train_file)}:{row.line}"
        return feature_of(row.values, tokenizer, cfg, row.line, where)

    def loss_items(self, feature: Feature) -> int:
        return 1 if feature.extra.get("keep", True) else 0

    def collate(self, features: list[Feature], pad_id: int) -> dict:
        return collate_ranking(features, pad_id)

    # evaluation
    def score_rows(self, objective, tokenizer, cfg: Config, rows: list[Row], device, batch_size: int,
                   where: str = "") -> list[list[float]]:
        features = [feature_of(r.values, tokenizer, cfg, r.line, f"{where}:{r.line}", overlength="truncate")
                    for r in rows]
        scores: list[list[float]] = [[] for _ in rows]
        for batch, out in score_features(objective, features, tokenizer.pad_token_id, device, batch_size):
            for i, s in zip(batch, out):
                scores[i] = s
        return scores

    def evaluate(self, model, tokenizer, cfg: Config, rows: list[Row], ctx: EvalContext) -> dict[str, float]:
        from app.atomic import write_json_atomic
        from app.tasks.ranking.metrics import ranking_metrics, table

        was_training = model.training
        model.eval()
        try:
            scores = self.score_rows(ctx.objective, tokenizer, cfg, rows, ctx.device, cfg.eval_batch_size,
                                     str(cfg.dev_file))
        finally:
            model.train(was_training)
        metrics = ranking_metrics(scores, [r.values["rewards"] for r in rows],
                                  [r.values.get("exact") or [x >= 1.0 for x in r.values["rewards"]] for r in rows])
        log.info("step %d ranking metrics (%d questions):\n%s", ctx.step, len(rows), table(metrics))
        if ctx.step:
            write_json_atomic(Path(ctx.out_dir) / "eval" / f"step_{ctx.step:07d}_ranking.json", metrics)
        return {k: v for k, v in metrics.items() if not math.isnan(v)}

    # inference
    def predictor(self, cfg: Config):
        from app.tasks.ranking.predict import Ranker

        return Ranker(self)
