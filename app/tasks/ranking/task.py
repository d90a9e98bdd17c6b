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

from torch import nn

from app.atomic import write_json_atomic
from app.config import Config
from app.data import Row, read_rows
from app.lm.kind import CausalLM
from app.modelcard import CardText
from app.tasks.protocol import EvalContext, Feature, Task
from app.tasks.ranking.config import METRICS
from app.tasks.ranking.features import check_row, collate_ranking, feature_of, score_features
from app.tasks.ranking.metrics import ranking_metrics, table
from app.tasks.ranking.model import build_objective, load_head, save_head
from app.tasks.ranking.predict import Ranker

log = logging.getLogger(__name__)


# --- the task -----------------------------------------------------------------------------------------------------
class Ranking(Task):
    name = "ranking"

    def model_kind(self, cfg: Config) -> CausalLM:
        # the question prefix's keys/values carry the candidates' gradients back: one forward per block under FSDP2
        return CausalLM(prefix_shares=("share_prompt_prefix", "share_question_prefix"))

    def objective(self, model, tokenizer, cfg: Config) -> nn.Module:
        return build_objective(model, cfg, tokenizer.pad_token_id)

    def save_extra(self, objective: nn.Module, directory: Path, cfg: Config) -> None:
        save_head(objective.head, directory, cfg)

    def load_extra(self, objective: nn.Module, directory: Path) -> None:
        load_head(objective.head, directory)

    def best_checkpoints(self, cfg: Config) -> dict[str, tuple[str, str]]:
        metric = cfg.metric_for_best or "accuracy"
        return {"best": (metric, METRICS.get(metric, "max")), "best_reward_ratio": ("reward_ratio", "max")}

    # data
    def load_rows(self, cfg: Config, split: str) -> list[Row]:
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
        return Ranker()

    def model_card(self, cfg: Config) -> CardText:
        return CardText(summary="FinQA candidate ranking: a decoder backbone and a score head pick the best of 8 "
                                "candidate answers.", pipeline_tag="text-classification")
