"""Per-step confidence regression: a `<CONFIDENCE>` marker after each reasoning step, an MLP head on its hidden state.

Input text (the marker is `cfg.step_marker`, added to the tokenizer as a special token whose embedding trains):

    Problem: Calculate 2+2.

    Step 1: Add the numbers together. <CONFIDENCE>
    Step 2: The result is 4. <CONFIDENCE>

The backbone's final hidden state at each marker position goes through the head
    Linear(hidden -> 1024) + GELU + Dropout(0.1), Linear(1024 -> 256) + GELU + Dropout(0.1), Linear(256 -> 1) + Sigmoid
(widths `head_hidden_sizes`, dropout `head_dropout`), which predicts that step's confidence in [0, 1]. The LM head is
never computed: `app.lm.last_hidden_states` runs the decoder body only, and only the marker rows reach the head.
Loss: the summed MSE (or Huber, `head_loss`) over labelled marker positions; the engine divides by the number of
labelled steps in the global batch (`loss_items`). Padding never reaches the loss: padded step slots are masked.

Positions travel with the tokens: `Feature.labels` holds, at each marker token, the index of its step (-100
elsewhere), and `Feature.extra["targets"]` the per-step labels (NaN = unlabelled). Whatever cuts tokens keeps each
marker with its own step's label. Truncation (`overlength="truncate"`) keeps the start of the text, cut at
`max_seq_length`: a step whose marker falls past the limit loses its label (and its score is null at scoring time);
the labels of the steps before it stay on their markers.

Data: `app.tasks.confidence_head.step_data` (generic JSONL, PRM800K, REVEAL, eQASC; mappings documented there). Several training files mix
by weight (`step_train_files`, `step_mix_size`, seeded by `seed`).

Checkpoint: the engine's weights (adapter with the marker row, or the full model) + `head.safetensors`
(app/tasks/confidence_head/model.py, strict key check on load) + `run_config.json`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.config import Config
from app.data import Row
from app.errors import UserError
from app.lm.kind import CausalLM
from app.metrics.calibration import reliability_data, save_reliability_json
from app.modelcard import CardText
from app.tasks.confidence_head.metrics import labelled_pairs, step_metrics
from app.tasks.confidence_head.model import (StepConfidenceObjective, build_objective, collate_steps, encode_steps,
                                             load_head, save_head, score_features)
from app.tasks.confidence_head.score_steps import StepScorer
from app.tasks.confidence_head.step_data import mix, read_step_file
from app.tasks.protocol import EvalContext, Feature, Task

log = logging.getLogger(__name__)


# --- the task -----------------------------------------------------------------------------------------------------
class ConfidenceHead(Task):
    name = "confidence_head"

    # model
    def model_kind(self, cfg: Config) -> CausalLM:
        return CausalLM(added_tokens=(cfg.step_marker,))

    def objective(self, model, tokenizer, cfg: Config) -> StepConfidenceObjective:
        """The loss module: backbone + a fresh head (a saved head is loaded through load_extra)."""
        return build_objective(model, cfg)

    def save_extra(self, objective: nn.Module, directory: Path, cfg: Config) -> None:
        save_head(objective.head, directory, cfg)

    def load_extra(self, objective: nn.Module, directory: Path) -> None:
        load_head(objective.head, directory)

    # data
    def _read(self, cfg: Config, path: str, require_labels: bool = True) -> list[Row]:
        return read_step_file(path, cfg.step_formats.get(path, "auto"), cfg.step_marker, require_labels)

    def load_rows(self, cfg: Config, split: str) -> list[Row]:
        if split != "train":
            files = list(cfg.step_dev_files) or ([cfg.dev_file] if cfg.dev_file else [])
            return [r for path in files for r in self._read(cfg, path)]
        files = dict(cfg.step_train_files) or ({cfg.train_file: 1.0} if cfg.train_file else {})
        for path, weight in files.items():
            if not (weight > 0 and math.isfinite(weight)):
                raise UserError(f"step_train_files: weight of {path} must be a positive number, found {weight!r}")
        datasets = [(path, weight, self._read(cfg, path)) for path, weight in files.items()]
        if len(datasets) == 1 and cfg.step_mix_size is None:
            return datasets[0][2]
        size = cfg.step_mix_size or sum(len(rows) for _, _, rows in datasets)
        rows = mix(datasets, size, cfg.seed)
        drawn = {path: 0 for path in files}
        for r in rows:
            drawn[r.values["source"]] = drawn.get(r.values["source"], 0) + 1
        log.info("training mix of %d rows: %s", size, ", ".join(
            f"{p} (weight {w:g}, {len(rs)} rows): {drawn.get(p, 0)}" for p, w, rs in datasets))
        return rows

    def encode(self, row: Row, tokenizer, cfg: Config) -> Feature:
        v = row.values
        return encode_steps(v["problem"], v["steps"], v["labels"], tokenizer, cfg.step_marker, None, row.line,
                            v.get("source", ""))

    def truncate(self, f: Feature, limit: int) -> Feature:
        """Keep the start of the text, cut at `limit`: a step whose marker falls past the limit loses its label;
        the labels of the steps before it stay on their markers (nothing shifts onto another marker)."""
        kept = f.labels[:limit]
        cut = sum(k != -100 for k in f.labels[limit:])
        return Feature(f.input_ids[:limit], kept, f.line, {**f.extra, "steps_cut": f.extra.get("steps_cut", 0) + cut})

    def loss_items(self, feature: Feature) -> int:
        targets = feature.extra["targets"]
        return sum(1 for k in feature.labels if k != -100 and not math.isnan(targets[k]))

    def collate(self, features: list[Feature], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_steps(features, pad_id)

    # evaluation
    def score_rows(self, objective, tokenizer, cfg: Config, rows: list[Row], device, batch_size: int):
        features = [encode_steps(r.values["problem"], r.values["steps"], r.values["labels"], tokenizer,
                                 cfg.step_marker, cfg.max_seq_length, r.line, r.values.get("source", ""))
                    for r in rows]
        scores: list[list] = [[] for _ in rows]
        for batch, out in score_features(objective, features, tokenizer.pad_token_id, device, batch_size):
            for i, s in zip(batch, out):
                scores[i] = s
        return scores

    def evaluate(self, model, tokenizer, cfg: Config, rows: list[Row], ctx: EvalContext) -> dict[str, float]:
        objective = ctx.objective
        device, step = ctx.device, ctx.step
        was_training = model.training
        model.eval()
        try:
            scores = self.score_rows(objective, tokenizer, cfg, rows, device, cfg.eval_batch_size)
        finally:
            model.train(was_training)
        s, y = labelled_pairs([r.values["labels"] for r in rows], scores)
        metrics = step_metrics(s, y)
        if s and step:
            save_reliability_json(reliability_data(np.clip(s, 0, 1), (np.asarray(y) >= 0.5).astype(float)),
                                  Path(ctx.out_dir) / "eval" / f"step_{step:07d}_reliability.json")
        return metrics

    # inference
    def predictor(self, cfg: Config):
        return StepScorer()

    def model_card(self, cfg: Config) -> CardText:
        return CardText(summary="A score head on the hidden state of a `<CONFIDENCE>` token after each reasoning step: "
                                "a per-step score in [0, 1].", pipeline_tag="text-classification")
