"""The task interface: what the engine asks of a task module.

The engine owns the loop (data order, accumulation, optimizer, checkpoints, resume, processes); a task owns
everything about its data and its loss. Adding a task is a new module under app/tasks/ with a subclass of
`Task`, registered in app/tasks/__init__.py; the engine does not change.

A task's `objective` is an nn.Module whose forward takes a collated batch and returns the *sum* of the
per-item losses of that batch. The engine divides by the number of loss items in the whole global batch
(known ahead of time from `loss_items`), so 1 process and N processes, or 1 and k accumulation steps,
give the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from app.config import Config
from app.data import Row


@dataclass
class Feature:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]  # same length; -100 where no loss is taken
    line: int = 0  # source line, for messages
    extra: dict = field(default_factory=dict)  # task-specific tensors-to-be (e.g. regression targets)


class Task:
    name = "base"
    required_columns: tuple[str, ...] = ()

    # --- model --------------------------------------------------------------------------------------
    def added_tokens(self, cfg: Config) -> list[str]:
        """Special tokens this task adds to the tokenizer (their embeddings train)."""
        return []

    def load_model(self, cfg: Config, device: torch.device, weights_dir: Path | None = None):
        """(model, tokenizer) ready to train. `weights_dir` holds a checkpoint to resume from."""
        from app.lm import modeling

        tokenizer = modeling.load_tokenizer(cfg, str(weights_dir) if weights_dir else None)
        new = [t for t in self.added_tokens(cfg) if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        full_ckpt = weights_dir is not None and not modeling.is_adapter_dir(weights_dir)
        model = modeling.load_base_model(cfg, device, path=str(weights_dir) if full_ckpt else None)
        modeling.fit_embeddings(model, tokenizer)
        trainable_ids = tokenizer.convert_tokens_to_ids(self.added_tokens(cfg))
        model = modeling.add_adapters(model, cfg, trainable_ids)
        if weights_dir is not None and modeling.is_adapter_dir(weights_dir):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(Path(weights_dir) / "adapter_model.safetensors")))
        return model, tokenizer

    def objective(self, model, cfg: Config | None = None) -> nn.Module:
        """The loss module. The engine passes the run's config; tests may leave it out (defaults apply)."""
        raise NotImplementedError

    def save_extra(self, objective: nn.Module, directory: Path) -> None:
        """Write task-owned weights (e.g. a regression head) next to the model weights."""

    def load_extra(self, objective: nn.Module, directory: Path) -> None:
        """Read what save_extra wrote (strict key check)."""

    # --- data ---------------------------------------------------------------------------------------
    def load_rows(self, cfg: Config, split: str) -> list[Row]:
        """Rows of `split` ("train" or "dev"). Override to mix several files (weights, per-dataset tags)."""
        from app.data import read_rows

        path = cfg.train_file if split == "train" else cfg.dev_file
        if path is None:
            return []
        return self.validate(path, read_rows(path, self.required_columns))

    def validate(self, path: str, rows: list[Row]) -> list[Row]:
        """Check rows; raise UserError naming file and line. Returns the rows to use."""
        return rows

    def encode(self, row: Row, tokenizer, cfg: Config) -> Feature:
        raise NotImplementedError

    def truncate(self, f: Feature, limit: int) -> Feature | None:
        """Fit an over-long example into `limit` tokens, or None to drop it. Default: cut prompt tokens after
        the first (BOS) so that every target token survives; None when the targets alone do not fit."""
        excess = len(f.input_ids) - limit
        prompt_len = next((i for i, t in enumerate(f.labels) if t != -100), len(f.labels))
        if prompt_len - 1 <= excess:
            return None
        keep = [0, *range(1 + excess, len(f.input_ids))]
        return Feature([f.input_ids[i] for i in keep], [f.labels[i] for i in keep], f.line, f.extra)

    def loss_items(self, feature: Feature) -> int:
        """How many loss terms this example contributes (target tokens, marked positions, ...)."""
        return sum(1 for t in feature.labels[1:] if t != -100)

    def collate(self, features: list[Feature], pad_id: int) -> dict:
        """Right-padded batch: input_ids, attention_mask, labels (tensors; a task may add plain ints, which
        the engine passes to the objective as they are)."""
        width = max(len(f.input_ids) for f in features)
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f.input_ids)
            ids[i, :n] = torch.tensor(f.input_ids)
            labels[i, :n] = torch.tensor(f.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # --- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, cfg: Config, rows: list[Row], device: torch.device, step: int) -> dict[str, float]:
        """Task metrics on dev rows (beyond dev loss, which the engine computes). Files a task writes per
        evaluation (reliability diagrams, say) go under cfg.out_dir, named with `step`."""
        return {}

    def best_checkpoints(self, cfg: Config) -> dict[str, tuple[str, str]]:
        """Checkpoint name -> (metric, "max" | "min"): each is kept as the best by its metric so far."""
        return {"best": (cfg.metric_for_best, "min" if cfg.metric_for_best.endswith("loss") else "max")}
