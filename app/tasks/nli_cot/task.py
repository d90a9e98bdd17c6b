"""NLI chain-of-thought SFT: premise + hypothesis -> {"thought_process": ..., "predicted_label": 0|1}.

Data: CSV or JSONL with premise, hypothesis, label (0/1) and an optional thought_process.
The prompt is `cfg.prompt_template`; the target is the JSON object followed by EOS. Loss is taken on the
target tokens only (prompt tokens are labelled -100).
"""

from __future__ import annotations

from collections.abc import Iterator

from app.config import Config
from app.data import Row, parse_binary_label
from app.errors import UserError
from app.lm.forward import CompletionLoss, shared_prefix_length
from app.metrics.classification import classification_metrics
from app.modelcard import CardText
from app.tasks.nli_cot.backends import Prediction, hf_batches
from app.tasks.nli_cot.predict import NliPredictor
from app.tasks.nli_cot.prompts import build_prompt, build_target
from app.tasks.protocol import EvalContext, Feature, Task


class NliCot(Task):
    name = "nli_cot"
    required_columns = ("premise", "hypothesis", "label")

    def objective(self, model, tokenizer, cfg: Config):
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

    # --- prediction (evaluation and inference share it: app.tasks.nli_cot.backends) ------------------------
    def predict_batches(self, model, tokenizer, cfg: Config, rows: list[dict], device, batch_size: int,
                        skip=None) -> Iterator[tuple[list[int], list[Prediction]]]:
        """(indices, predictions) batch by batch, longest prompts first, as `infer --backend=hf` predicts."""
        return hf_batches(model, tokenizer, cfg, rows, device, batch_size, skip)

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
        return NliPredictor(cfg)

    def model_card(self, cfg: Config) -> CardText:
        return CardText(
            summary="Natural language inference with chain-of-thought: given a premise and a hypothesis, the model "
                    'answers with `{"thought_process": "...", "predicted_label": 0|1}` (1: the premise entails the '
                    "hypothesis).",
            limitation="Binary labels only (NLI: entailment or not); the reasoning text is generated and may be wrong "
                       "even when the label is right.")
