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

Checkpoint: the engine's weights (adapter with the marker row, or the full model) + `head.safetensors` (this module,
strict key check on load) + `run_config.json`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.config import Config
from app.data import Row
from app.errors import UserError
from app.lm.forward import last_hidden_states, unwrap_peft
from app.tasks.protocol import EvalContext, Feature, Task

log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"


# --- text ---------------------------------------------------------------------------------------------------------
def build_text(problem: str, steps: list[str], marker: str) -> str:
    return f"Problem: {problem}\n\n" + "\n".join(f"Step {k}: {s} {marker}" for k, s in enumerate(steps, start=1))


def marker_id(tokenizer, marker: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(marker)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != marker:
        raise UserError(f"step_marker={marker!r} is not a token of this tokenizer (the task adds it; was the "
                        "checkpoint trained with another marker?)")
    return tid


def encode_steps(problem: str, steps: list[str], labels: list[float | None], tokenizer, marker: str,
                 max_len: int | None, line: int = 0, source: str = "") -> Feature:
    """Token ids with the step index at each marker (labels) and per-step targets; cut at max_len when given."""
    mid = marker_id(tokenizer, marker)
    ids = tokenizer(build_text(problem, steps, marker)).input_ids
    positions = [i for i, t in enumerate(ids) if t == mid]
    if len(positions) != len(steps):
        raise UserError(f"{source}:{line}: {len(positions)} marker tokens for {len(steps)} steps (the tokenizer "
                        f"does not keep {marker!r} whole)")
    cut = 0
    if max_len is not None and len(ids) > max_len:
        ids = ids[:max_len]
        cut = sum(p >= max_len for p in positions)
        positions = [p for p in positions if p < max_len]
    tags = [-100] * len(ids)
    for k, p in enumerate(positions):
        tags[p] = k
    targets = [math.nan if v is None else float(v) for v in labels]
    return Feature(ids, tags, line, {"targets": targets, "n_steps": len(steps), "steps_cut": cut})


def collate_steps(features: list[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids; per example its marker positions [B, S], which are real, their targets and which count."""
    width = max(len(f.input_ids) for f in features)
    slots = max(1, max(sum(t != -100 for t in f.labels) for f in features))
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    positions = torch.zeros((len(features), slots), dtype=torch.long)
    step_mask = torch.zeros((len(features), slots), dtype=torch.bool)
    targets = torch.zeros((len(features), slots), dtype=torch.float32)
    target_mask = torch.zeros((len(features), slots), dtype=torch.bool)
    for i, f in enumerate(features):
        n = len(f.input_ids)
        ids[i, :n] = torch.tensor(f.input_ids)
        mask[i, :n] = 1
        marked = [(p, k) for p, k in enumerate(f.labels) if k != -100]
        for s, (p, k) in enumerate(marked):
            positions[i, s], step_mask[i, s] = p, True
            y = f.extra["targets"][k]
            if not math.isnan(y):
                targets[i, s], target_mask[i, s] = y, True
    return {"input_ids": ids, "attention_mask": mask, "positions": positions, "step_mask": step_mask,
            "targets": targets, "target_mask": target_mask}


# --- the head and the loss ----------------------------------------------------------------------------------------
class ConfidenceMLP(nn.Module):
    """Linear(hidden -> h1) + GELU + Dropout, ..., Linear(h_last -> 1) + Sigmoid."""

    def __init__(self, hidden_size: int, hidden_sizes=(1024, 256), dropout: float = 0.1):
        super().__init__()
        layers, width = [], hidden_size
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers += [nn.Linear(width, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class StepConfidenceObjective(nn.Module):
    """Backbone + head. `forward` is the summed regression loss of a batch; `scores` the per-step confidences."""

    def __init__(self, model, head: ConfidenceMLP, loss: str = "mse", huber_delta: float = 1.0):
        super().__init__()
        self.model, self.head = model, head
        self.loss, self.huber_delta = loss, huber_delta

    def marker_scores(self, input_ids, attention_mask, positions, step_mask) -> torch.Tensor:
        """Confidences of the real step slots, flattened in (example, slot) order."""
        # the engine switches the backbone between train and eval; the head follows it (dropout)
        if self.head.training != self.model.training:
            self.head.train(self.model.training)
        hidden = last_hidden_states(self.model, input_ids, attention_mask)  # [B, T, H]: no LM head
        rows, slots = step_mask.nonzero(as_tuple=True)
        picked = hidden[rows, positions[rows, slots]]  # [N, H]: only the marker rows
        weight = self.head.net[0].weight
        return self.head(picked.to(weight.dtype)).float()

    @torch.no_grad()
    def scores(self, input_ids, attention_mask, positions, step_mask) -> torch.Tensor:
        """[B, S] confidences, NaN in padded slots."""
        out = torch.full(step_mask.shape, math.nan, device=step_mask.device)
        out[step_mask] = self.marker_scores(input_ids, attention_mask, positions, step_mask)
        return out

    def forward(self, input_ids, attention_mask, positions, step_mask, targets, target_mask):
        pred = self.marker_scores(input_ids, attention_mask, positions, step_mask)
        keep = target_mask[step_mask]
        pred, y = pred[keep], targets[step_mask][keep].float()
        if self.loss == "huber":
            return F.huber_loss(pred, y, delta=self.huber_delta, reduction="sum")
        return F.mse_loss(pred, y, reduction="sum")


def hidden_size_of(model) -> int:
    return int(unwrap_peft(model).get_input_embeddings().weight.shape[1])


def build_objective(model, cfg: Config) -> StepConfidenceObjective:
    head = ConfidenceMLP(hidden_size_of(model), tuple(cfg.head_hidden_sizes), cfg.head_dropout)
    device = unwrap_peft(model).get_input_embeddings().weight.device
    return StepConfidenceObjective(model, head.to(device), cfg.head_loss, cfg.head_huber_delta)


def save_head(head: nn.Module, directory: Path, cfg: Config | None = None) -> Path:
    from app.lm.heads import save_head_file

    meta = {} if cfg is None else {"step_marker": cfg.step_marker, "head_hidden_sizes": json.dumps(cfg.head_hidden_sizes)}
    return save_head_file(head, Path(directory) / HEAD_FILE, meta)


def load_head(head: nn.Module, directory: Path) -> None:
    """Load head.safetensors into `head`: the keys and shapes must be exactly the head's."""
    from app.lm.heads import load_head_file

    load_head_file(head, Path(directory) / HEAD_FILE, "confidence_head", "head_hidden_sizes")


# --- metrics (numpy only) -----------------------------------------------------------------------------------------
def rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    return float(np.dot(dx, dy) / denom) if denom > 0 else math.nan


def spearman(x, y) -> float:
    return pearson(rank_average(np.asarray(x, np.float64)), rank_average(np.asarray(y, np.float64)))


def auroc(scores, positive) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half); NaN with one class only."""
    s, pos = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rank_average(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def step_metrics(scores, labels, n_bins: int = 10) -> dict:
    """MSE, MAE, Pearson, Spearman, AUROC (label >= 0.5 is a correct step), calibration (equal-width ECE of the
    scores against label >= 0.5, Brier) over labelled steps. NaN where a metric is undefined."""
    from app.metrics.calibration import calibration_report

    s, y = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    out = {"steps": float(len(s))}
    if len(s) == 0:
        return {**out, **{k: math.nan for k in ("mse", "mae", "pearson", "spearman", "auroc", "ece", "brier")}}
    correct = (y >= 0.5).astype(np.float64)
    report = calibration_report(np.clip(s, 0.0, 1.0), correct, n_bins=n_bins)
    out.update(mse=float(np.mean((s - y) ** 2)), mae=float(np.mean(np.abs(s - y))), pearson=pearson(s, y),
               spearman=spearman(s, y), auroc=auroc(s, correct), ece=report["ece_l1"], brier=report["brier"])
    return out


# --- scoring ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def score_features(objective: StepConfidenceObjective, features: list[Feature], pad_id: int, device, batch_size: int,
                   skip: Callable[[list[int]], bool] | None = None) -> Iterator[tuple[list[int], list[list]]]:
    """(feature indices, per feature its per-step scores with None for steps cut by truncation), longest first."""
    order = sorted(range(len(features)), key=lambda i: -len(features[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if skip is not None and skip(batch):
            continue
        b = collate_steps([features[i] for i in batch], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        out = objective.scores(b["input_ids"], b["attention_mask"], b["positions"], b["step_mask"]).cpu()
        results = []
        for row, i in enumerate(batch):
            f = features[i]
            per_step: list = [None] * f.extra["n_steps"]
            for slot, k in enumerate(k for k in f.labels if k != -100):
                per_step[k] = float(out[row, slot])
            results.append(per_step)
        yield batch, results


def labelled_pairs(rows_labels: list[list], rows_scores: list[list]) -> tuple[list[float], list[float]]:
    scores, labels = [], []
    for labs, scs in zip(rows_labels, rows_scores):
        for y, s in zip(labs, scs):
            if y is not None and s is not None:
                scores.append(s)
                labels.append(y)
    return scores, labels


# --- the task -----------------------------------------------------------------------------------------------------
class ConfidenceHead(Task):
    name = "confidence_head"

    # model
    def added_tokens(self, cfg: Config) -> list[str]:
        return [cfg.step_marker]

    def objective(self, model, cfg: Config) -> StepConfidenceObjective:
        """The loss module: backbone + a fresh head (a saved head is loaded through load_extra)."""
        lm = unwrap_peft(model)
        out_emb, in_emb = lm.get_output_embeddings(), lm.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            # the LM head is never computed: nothing to train there (and DDP would wait for its gradient forever)
            out_emb.weight.requires_grad_(False)
        return build_objective(model, cfg)

    def save_extra(self, objective: nn.Module, directory: Path, cfg: Config) -> None:
        save_head(objective.head, directory, cfg)

    def load_extra(self, objective: nn.Module, directory: Path) -> None:
        load_head(objective.head, directory)

    # data
    def _read(self, cfg: Config, path: str, require_labels: bool = True) -> list[Row]:
        from app.tasks.confidence_head.step_data import read_step_file

        return read_step_file(path, cfg.step_formats.get(path, "auto"), cfg.step_marker, require_labels)

    def load_rows(self, cfg: Config, split: str) -> list[Row]:
        from app.tasks.confidence_head.step_data import mix

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
            from app.metrics.calibration import reliability_data, save_reliability_json

            save_reliability_json(reliability_data(np.clip(s, 0, 1), (np.asarray(y) >= 0.5).astype(float)),
                                  Path(ctx.out_dir) / "eval" / f"step_{step:07d}_reliability.json")
        return metrics

    # inference
    def predictor(self, cfg: Config):
        from app.tasks.confidence_head.score_steps import StepScorer

        return StepScorer(self)
