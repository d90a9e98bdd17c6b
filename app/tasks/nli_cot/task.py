"""NLI chain-of-thought SFT: premise + hypothesis -> {"thought_process": ..., "predicted_label": 0|1}.

Data: CSV or JSONL with premise, hypothesis, label (0/1) and an optional thought_process.
The prompt is `cfg.prompt_template`; the target is the JSON object followed by EOS. Loss is taken on the
target tokens only (prompt tokens are labelled -100).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from app.config import Config
from app.data import Row, parse_binary_label
from app.errors import UserError
from app.tasks.nli_cot.extract import extract_label
from app.lm.generate import generate_batches, next_token_logits
from app.lm.forward import CompletionLoss, shared_prefix_length
from app.metrics.classification import classification_metrics
from app.tasks.nli_cot.prompts import build_prompt, build_target
from app.tasks.protocol import EvalContext, Feature, Task


@dataclass
class Prediction:
    label: int
    thought: str
    parse_ok: bool  # False: the label came from the forced-prefix fallback
    how: str
    generation: str


class NliCot(Task):
    name = "nli_cot"
    required_columns = ("premise", "hypothesis", "label")

    def objective(self, model, cfg: Config):
        return CompletionLoss(model, share_prefix=cfg.share_prompt_prefix)

    def truncate(self, f: Feature, limit: int) -> Feature | None:
        """Cut the middle of the prompt: its head (the instruction, the start of the premise) and its tail (the
        hypothesis, "Answer: ") stay, and so does every target token. None when the targets alone do not fit."""
        prompt_len = next((i for i, t in enumerate(f.labels) if t != -100), len(f.labels))
        room = prompt_len - (len(f.input_ids) - limit)  # prompt tokens that fit
        if room < 2:
            return None
        head = room // 2
        keep = [*range(head), *range(prompt_len - (room - head), len(f.input_ids))]
        return Feature([f.input_ids[i] for i in keep], [f.labels[i] for i in keep], f.line, f.extra)

    def collate(self, features: list[Feature], pad_id: int) -> dict:
        batch = super().collate(features, pad_id)
        batch["shared_prefix"] = shared_prefix_length([f.input_ids for f in features], [f.labels for f in features])
        return batch

    def validate(self, path, rows: list[Row], cfg: Config) -> list[Row]:
        for row in rows:
            row.values["label"] = parse_binary_label(row.values.get("label"), path, row.line)
            for col in ("premise", "hypothesis"):
                if not isinstance(row.values.get(col), str):
                    raise UserError(f"{path}:{row.line}: {col} must be text, found {row.values.get(col)!r}")
        return rows

    def encode(self, row: Row, tokenizer, cfg: Config) -> Feature:
        prompt_ids = tokenizer(build_prompt(row.values, cfg)).input_ids
        thought = (row.values.get("thought_process") or "").strip() or None
        target_ids = tokenizer(build_target(row.values["label"], thought), add_special_tokens=False).input_ids
        target_ids.append(tokenizer.eos_token_id)
        return Feature(prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids, line=row.line)

    # --- prediction (evaluation and inference share it) ---------------------------------------------
    def predict_batches(
        self, model, tokenizer, cfg: Config, rows: list[dict], device, batch_size: int, skip=None
    ) -> Iterator[tuple[list[int], list[Prediction]]]:
        prompts = [build_prompt(r, cfg) for r in rows]
        for batch, texts in generate_batches(model, tokenizer, prompts, batch_size, cfg.max_new_tokens, device, skip,
                                              prefill_tokens=cfg.prefill_tokens):
            found = [extract_label(t) for t in texts]
            preds = [Prediction(e.label, e.thought, e.ok, e.how, t) for e, t in zip(found, texts)]
            missing = [k for k, p in enumerate(preds) if p.label is None]
            if missing:
                labels = self.forced_labels(model, tokenizer, [prompts[batch[k]] for k in missing],
                                            [preds[k].thought for k in missing], device, cfg.prefill_tokens)
                for k, label in zip(missing, labels):
                    preds[k].label, preds[k].parse_ok, preds[k].how = label, False, "forced_prefix"
            yield batch, preds

    def forced_labels(self, model, tokenizer, prompts: list[str], thoughts: list[str], device,
                      prefill_tokens: int) -> list[int]:
        """Pick 0 or 1 by which label token the model ranks higher after a forced `"predicted_label": ` prefix
        (one forward pass per row, up to the token where the two labelled texts part)."""
        ids, zero, one = [], [], []
        for prompt, thought in zip(prompts, thoughts):
            head = '{"thought_process": ' + json.dumps(thought, ensure_ascii=False) + ", " if thought else "{"
            prefix = prompt + head + '"predicted_label": '
            c0, c1 = tokenizer(prefix + "0").input_ids, tokenizer(prefix + "1").input_ids
            # the joint tokenization may merge the label with what precedes it: score where the two part
            k = next(i for i, (a, b) in enumerate(zip(c0, c1)) if a != b)
            ids.append(c0[:k])
            zero.append(c0[k])
            one.append(c1[k])
        logits = next_token_logits(model, ids, tokenizer.pad_token_id, device, prefill_tokens)
        rows = torch.arange(len(ids), device=logits.device)
        return (logits[rows, torch.tensor(one, device=logits.device)]
                > logits[rows, torch.tensor(zero, device=logits.device)]).long().tolist()

    def evaluate(self, model, tokenizer, cfg, rows: list[Row], ctx: EvalContext) -> dict[str, float]:
        values = [r.values for r in rows]
        preds: list[Prediction | None] = [None] * len(values)
        for batch, out in self.predict_batches(model, tokenizer, cfg, values, ctx.device, cfg.eval_batch_size):
            for i, p in zip(batch, out):
                preds[i] = p
        gold = [int(v["label"]) for v in values]
        metrics = classification_metrics(gold, [p.label for p in preds])
        return {
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["f1_macro"],
            "parse_failures": float(sum(not p.parse_ok for p in preds)),
        }

    def predictor(self, cfg: Config):
        from app.tasks.nli_cot.predict import NliPredictor

        return NliPredictor(self, cfg)
