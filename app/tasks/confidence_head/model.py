"""The confidence_head model: the text with a marker after each step and its features (`encode_steps`,
`collate_steps`), the MLP head on the markers' hidden states and the loss (`StepConfidenceObjective`), the head's file
(head.safetensors) and scoring features with a trained objective. Training (task.py) and `score-steps` / `infer`
(score_steps.py) share them; the task's docstring says what the model computes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from app.config import Config
from app.data import Feature
from app.errors import UserError
from app.lm.forward import last_hidden_states, unwrap_peft
from app.lm.heads import load_head_file, save_head_file

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
    """The loss module: backbone + a fresh head (a saved head is loaded with load_head). The LM head is never
    computed, so its weight (when not tied to the input embedding) is frozen: nothing to train there, and DDP would
    wait for its gradient forever."""
    lm = unwrap_peft(model)
    out_emb, in_emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if out_emb is not None and out_emb.weight is not in_emb.weight:
        out_emb.weight.requires_grad_(False)
    head = ConfidenceMLP(hidden_size_of(model), tuple(cfg.head_hidden_sizes), cfg.head_dropout)
    device = unwrap_peft(model).get_input_embeddings().weight.device
    return StepConfidenceObjective(model, head.to(device), cfg.head_loss, cfg.head_huber_delta)


def save_head(head: nn.Module, directory: Path, cfg: Config | None = None) -> Path:
    meta = {} if cfg is None else {"step_marker": cfg.step_marker, "head_hidden_sizes": json.dumps(cfg.head_hidden_sizes)}
    return save_head_file(head, Path(directory) / HEAD_FILE, meta)


def load_head(head: nn.Module, directory: Path) -> None:
    """Load head.safetensors into `head`: the keys and shapes must be exactly the head's."""
    load_head_file(head, Path(directory) / HEAD_FILE, "confidence_head", "head_hidden_sizes")


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
