"""The task protocol: everything the engine and the inference commands ask of a task, in one place.

The engine (app/engine/loop.py) owns the loop: data order, accumulation, mixed precision, processes, optimizer,
schedule, checkpoints and exact resume. A task owns its data, its model (a model kind), its loss and its metrics.
Every method receives the context it needs (the config always), so a task keeps no state between calls.

    method                         default                              override when
    ------                         -------                              -------------
    load_rows(cfg, split)          read_rows(train_file / dev_file)     several files, mixing, raw validation rows
    encode(row, tokenizer, cfg)    (required)                           always: row -> Feature
    truncate(feature, limit)       cut prompt tokens after BOS          a smarter cut
    train_window(cfg)              None: whole examples                 train on windows of N tokens at random offsets
    loss_items(feature)            target tokens                        other units; {"name": count} for several losses
    collate(features, pad_id)      right-padded ids, mask, labels       extra tensors (a plain int passes through)
    model_kind(cfg)                CausalLM(): Hugging Face + adapters  added tokens, head rows, a model of its own
                                                                        (app.lm.kind: load, save, FSDP2 blocks and
                                                                        overrides, optimizer parameter groups)
    objective(model, tokenizer,    (required)                           always: nn.Module, forward(**batch) -> sums
              cfg)
    save_extra / load_extra        nothing                              weights beside the model's (a score head)
    loss_weights(cfg)              1.0 each                             weighted sum of several named losses
    evaluate(model, tok, cfg,      {}                                   task metrics; files it writes go under
             rows, ctx)                                                 ctx.out_dir (ctx.step, ctx.epoch, ctx.objective)
    best_checkpoints(cfg)          {"best": metric_for_best}            several best-by-metric checkpoints
    on_train_end(cfg, final_dir)   nothing                              push to a hub, export
    predictor(cfg)                 None (no inference command)          what `infer` reads, predicts and writes
    model_card(cfg)                a causal LM fine-tuned from          what the checkpoint's card says: summary,
                                   model_name, text-generation          pipeline tag, how to load it (app.modelcard)

Losses. `objective(**batch)` returns the *sum* of the per-item losses of the batch (a tensor), or several named sums
(`{"lm": tensor, "confidence": tensor}`) with `loss_items` giving the matching counts per example
(`{"lm": 12, "confidence": 1}`). The engine divides each sum by its count over the whole global batch (known ahead
from the data plan, no communication), backpropagates the `loss_weights`-weighted total and logs every loss, so 1 and
N processes, or 1 and k accumulation steps, give the same update.

A minimal task (see app/tasks/nli_cot/ for a full one):

    class Echo(Task):
        name = "echo"
        def encode(self, row, tokenizer, cfg):
            prompt = tokenizer(row.values["text"]).input_ids
            target = tokenizer(row.values["text"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            return Feature(prompt + target, [-100] * len(prompt) + target, row.line)
        def objective(self, model, tokenizer, cfg):
            return CompletionLoss(model)           # app.lm.forward: summed cross-entropy on target tokens

plus its config section (app/tasks/echo/config.py: a `Section` subclass, METRICS, DEFAULT_METRIC) and one entry in
app/registry.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from app.config import Config
from app.data import Feature, Row, read_rows  # Feature lives below the engine, which reads it too
from app.engine.context import EvalContext  # built by the engine, read by the tasks
from app.lm.kind import CausalLM, ModelKind
from app.modelcard import CardText
from app.registry import default_metric, task_metrics


class Predictor(Protocol):
    """What an inference command runs for a task (app/runs.py calls these in this order)."""

    default_output: str  # file name of the main output
    verb: str  # progress-bar label

    def fingerprint_parts(self, cfg) -> dict: ...  # extra identity of the outputs, beside input/checkpoint/config
    def read_input(self, path: Path, cfg): ...  # before any model loads: bad input is a UserError naming the line
    def output_paths(self, output: Path): ...  # has .main and .partial
    def load(self, checkpoint: Path, cfg, device): ...  # whatever predict needs (model, tokenizer, ...)
    def predict(self, state, cfg, inputs, device, skip) -> Iterator[list[dict]]: ...  # records with "i", per batch
    def finish(self, inputs, records: list[dict], paths, summary: dict, examples: int) -> dict: ...  # write, print


class Task:
    name = "base"
    required_columns: tuple[str, ...] = ()

    # --- model --------------------------------------------------------------------------------------------------
    def model_kind(self, cfg: Config) -> ModelKind:
        """The model side of the run (app.lm.kind): how it loads and saves, how FSDP2 shards it, its optimizer
        groups. Default: a Hugging Face causal LM with adapters, no added tokens."""
        return CausalLM()

    def objective(self, model, tokenizer, cfg: Config) -> nn.Module:
        """The loss module: forward(**batch) -> summed loss (or {name: sum})."""
        raise NotImplementedError

    def save_extra(self, objective: nn.Module, directory: Path, cfg: Config) -> None:
        """Write task-owned weights (e.g. a regression head) next to the model weights."""

    def load_extra(self, objective: nn.Module, directory: Path) -> None:
        """Read what save_extra wrote (strict key check)."""

    def loss_weights(self, cfg: Config) -> dict[str, float]:
        """Weight of each named loss in the total that is backpropagated (names missing here weigh 1.0)."""
        return {}

    # --- data ---------------------------------------------------------------------------------------------------
    def load_rows(self, cfg: Config, split: str) -> list[Row]:
        """Rows of `split` ("train" or "dev"). Override to mix several files (weights, per-dataset tags)."""
        path = cfg.train_file if split == "train" else cfg.dev_file
        if path is None:
            return []
        return self.validate(path, read_rows(path, self.required_columns), cfg)

    def validate(self, path: str, rows: list[Row], cfg: Config) -> list[Row]:
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

    def train_window(self, cfg: Config) -> int | None:
        """Train on windows of this many tokens of each training example, cut at offsets the data plan draws anew
        each time the example is drawn (app.engine.batching), or None for whole examples. Default: None."""
        return None

    def loss_items(self, feature: Feature) -> int | dict[str, int]:
        """How many loss terms this example contributes (target tokens, marked positions, ...), or one count per
        named loss."""
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

    # --- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, cfg: Config, rows: list[Row], ctx: EvalContext) -> dict[str, float]:
        """Task metrics on dev rows (beyond dev loss, which the engine computes)."""
        return {}

    def best_checkpoints(self, cfg: Config) -> dict[str, tuple[str, str]]:
        """Checkpoint name -> (metric, "max" | "min"): each is kept as the best by its metric so far."""
        metric = cfg.metric_for_best or default_metric(cfg.task)
        return {"best": (metric, task_metrics(cfg.task).get(metric, "min" if metric.endswith("loss") else "max"))}

    def on_train_end(self, cfg: Config, final_dir: Path) -> None:
        """Called once on the main process after the final checkpoint is published."""

    # --- inference ----------------------------------------------------------------------------------------------
    def predictor(self, cfg: Config) -> Predictor | None:
        """What `python -m app infer` runs for this task's checkpoints; None when it has no inference command."""
        return None

    def model_card(self, cfg: Config) -> CardText:
        """What the model card of this task's checkpoints says (app.modelcard.CardText): what the model does, its
        pipeline tag, how to load it. Default: a causal LM fine-tuned from `model_name`, loaded with transformers."""
        return CardText(summary=f"Task `{cfg.task}`.")
