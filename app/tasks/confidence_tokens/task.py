"""Confidence tokens: the model answers a question, then appends `<C_…>` (its answer is correct) or `<U_…>` (it is not).

Domains are config: `confidence_tokens = {"boolq": ["<C_READ>", "<U_READ>"], "medqa": ["<C_MED>", "<U_MED>"]}`
maps each dataset to its (confident, unconfident) pair; every token is added as a special token.

Data
----
Training JSONL/CSV rows: `question` (the text shown to the model: passage or options included), `tagged_response`
(the answer followed by exactly one of its dataset's two tokens, last: `"Yes <C_READ>"`) and `dataset`.
`python -m app tag` writes such rows from raw QA data and a model (app/tag.py).

Raw QA rows (validation, and the input of `tag`), per dataset:
  yes/no (BoolQ):        question, answer (true/false, yes/no or 0/1), optional passage
  multiple choice (MedQA): question, options ({"A": text, ...}, a list, or columns A, B, ...), answer or answer_idx
                           (the letter, or exactly one option's text)
A row with options (or columns A and B) is multiple choice; any other row is yes/no.

Training
--------
A feature is prompt + answer + token; only the token is a target (the answer tokens are context). The objective
runs the decoder, gathers the final hidden state just before each token and projects only those rows through the LM
head (`confidence_loss = "full_vocab"`: cross-entropy over the vocabulary; `"pair"`: over the domain's two tokens).
Full-sequence logits are never built. With LoRA the rows of the new tokens in both the input embeddings and the LM
head are trainable token rows (peft `trainable_token_indices`), so the adapter checkpoint carries them; they start
at the mean of the existing rows.

Validation (each evaluation, per dataset and averaged over datasets)
--------------------------------------------------------------------
Greedy generation of the answer (stopping at EOS or any confidence token; the first new token is neither, since an
answer comes first), answer parsing (yes/no; option letter), correctness against the gold answer, the expected token
(C if correct, else U). The token position is the position right after the generated answer; one extra forward pass
over prompt + answer gives the distribution there: `p_confident = p(C) / (p(C) + p(U))`. The predicted token is the
token the model generated there (`full_vocab`; none generated counts as wrong) or the likelier of the two (`pair`:
the model only learned to rank C against U, not when to emit one, so the answer is generated without the tokens). Metrics: `token_accuracy` (predicted == expected), `answer_accuracy`,
`token_emitted`, `p_confident`, `token_nll`, the calibration report of app/calibration.py (`calibration_error` is
`calibration_metric`), `majority_baseline`; `dev_loss` (engine) is teacher-forced: gold answer + C on odd lines,
a wrong answer + U on even lines. Each evaluation writes `reliability_epoch_N.json` + `.png` under out_dir when it
falls on the end of epoch N (else `reliability_step_S.*`; with several datasets also one PNG per dataset) and prints
a per-dataset table. Checkpoints `best_accuracy/` (token_accuracy) and `best_calibration/` (calibration_error).

`hub_repo` pushes the final adapter and tokenizer to the Hugging Face Hub (token from HF_TOKEN in the environment).

Sample data: `python -m app.tasks.confidence_tokens.sample data/sample/confidence` (deterministic; see `write_sample`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from app.config import Config
from app.data import Row, read_rows
from app.errors import UserError
from app.lm.kind import CausalLM
from app.metrics.calibration import save_reliability_json, save_reliability_png
from app.modelcard import CardText
from app.tasks.confidence_tokens.hub import hub_token, push_to_hub
from app.tasks.confidence_tokens.judge import format_summary, judge, summarize
from app.tasks.confidence_tokens.loss import ConfidenceTokenLoss
from app.tasks.confidence_tokens.predict import ConfidencePredictor
from app.tasks.confidence_tokens.qa import QA, all_tokens, answer_ids, answer_text, domain_tokens, prompt_ids, raw_qa, read_raw_qa, wrong_answer
from app.tasks.protocol import EvalContext, Feature, Task

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --- the task ------------------------------------------------------------------------------------------------------
class ConfidenceTokens(Task):
    name = "confidence_tokens"
    required_columns = ("question", "tagged_response", "dataset")

    # --- model --------------------------------------------------------------------------------------------------
    def model_kind(self, cfg: Config) -> CausalLM:
        # the LM-head rows of the tokens train too: an untied head would otherwise keep identical rows for C and U,
        # and p(C) / (p(C) + p(U)) would stay 0.5
        return CausalLM(added_tokens=tuple(all_tokens(cfg)), head_rows=True)

    def objective(self, model, tokenizer, cfg: Config) -> nn.Module:
        return ConfidenceTokenLoss(model, cfg.confidence_loss)

    def on_train_end(self, cfg: Config, final_dir: Path) -> None:
        """The final adapter and tokenizer go to the Hub when `hub_repo` is set (a failure is logged, not raised)."""
        if cfg.hub_repo:
            push_to_hub(Path(final_dir), cfg.hub_repo)

    # --- data -----------------------------------------------------------------------------------------------------
    def _check_cfg(self, cfg: Config) -> None:
        domain_tokens(cfg)
        if not cfg.confidence_chat_template and "{question}" not in cfg.confidence_prompt:
            raise UserError(f"confidence_prompt={cfg.confidence_prompt!r}: needs {{question}}")

    def load_rows(self, cfg: Config, split: str) -> list[Row]:
        self._check_cfg(cfg)
        if split == "train":
            if cfg.hub_repo and not hub_token():
                raise UserError(f"hub_repo={cfg.hub_repo!r} needs a Hugging Face token in the environment (HF_TOKEN)")
            return self.validate(cfg.train_file, read_rows(cfg.train_file, self.required_columns), cfg)
        return self.validation_rows(cfg)

    def validation_rows(self, cfg: Config) -> list[Row]:
        """Raw QA rows of every validation dataset, interleaved (so that eval_rows takes some of each)."""
        pairs = domain_tokens(cfg)
        sources: list[tuple[str | None, str]] = [(name, path) for name, path in cfg.validation_files.items()]
        if not sources and cfg.dev_file:
            sources = [(None, cfg.dev_file)]
        per_file = []
        for name, path in sources:
            if name is not None and name not in pairs:
                raise UserError(f"validation_files: dataset {name!r} has no tokens in confidence_tokens "
                                f"(known: {', '.join(pairs)})")
            per_file.append([Row(row.line, {**row.values, "dataset": dataset, "_qa": qa})
                             for row, dataset, qa in read_raw_qa(path, name, pairs)])
        merged = []
        for k in range(max((len(r) for r in per_file), default=0)):
            merged += [rows[k] for rows in per_file if k < len(rows)]
        return merged

    def validate(self, path, rows: list[Row], cfg: Config) -> list[Row]:
        pairs = domain_tokens(cfg)
        every = all_tokens(cfg)
        for row in rows:
            v = row.values
            dataset = v.get("dataset")
            if dataset not in pairs:
                raise UserError(f"{path}:{row.line}: dataset {dataset!r} has no tokens in confidence_tokens "
                                f"(known: {', '.join(pairs)})")
            if not isinstance(v.get("question"), str) or not v["question"].strip():
                raise UserError(f"{path}:{row.line}: question must be non-empty text, found {v.get('question')!r}")
            response = v.get("tagged_response")
            if not isinstance(response, str):
                raise UserError(f"{path}:{row.line}: tagged_response must be text, found {response!r}")
            text = response.rstrip()
            token = next((t for t in pairs[dataset] if text.endswith(t)), None)
            if token is None:
                raise UserError(f"{path}:{row.line}: tagged_response must end with {pairs[dataset][0]} or "
                                f"{pairs[dataset][1]} (dataset {dataset!r}), found {response[-40:]!r}")
            answer = text[: -len(token)]
            stray = next((t for t in every if t in answer), None)
            if stray is not None:
                raise UserError(f"{path}:{row.line}: tagged_response holds {stray} before its end; exactly one "
                                "confidence token, last, is expected")
            v["_answer"], v["_token"] = answer.strip(), token
        return rows

    def encode(self, row: Row, tokenizer, cfg: Config) -> Feature:
        v = row.values
        pairs = domain_tokens(cfg)
        qa: QA | None = v.get("_qa")
        if qa is not None:  # raw validation row: teacher-forced gold + C (odd lines) or wrong + U (even lines)
            good = row.line % 2 == 1
            text = qa.text
            answer = answer_text(qa, qa.gold if good else wrong_answer(qa))
            token = pairs[qa.dataset][0 if good else 1]
        else:
            if "_token" not in v:
                self.validate("data", [row], cfg)
            text, answer, token = v["question"], v["_answer"], v["_token"]
        ids = prompt_ids(text, tokenizer, cfg) + answer_ids(answer, tokenizer, cfg)
        token_id = tokenizer.convert_tokens_to_ids(token)
        c_id, u_id = tokenizer.convert_tokens_to_ids(list(pairs[v["dataset"]]))
        if token_id in (None, tokenizer.unk_token_id) or c_id == u_id:
            raise UserError(f"{token!r} is not a token of this tokenizer (load the model through the task)")
        ids.append(token_id)
        return Feature(ids, [-100] * (len(ids) - 1) + [token_id], line=row.line, extra={"pair": [c_id, u_id]})

    def loss_items(self, feature: Feature) -> int:
        return 1  # one confidence token per example

    def collate(self, features: list[Feature], pad_id: int) -> dict[str, torch.Tensor]:
        batch = super().collate(features, pad_id)
        batch["conf_index"] = torch.tensor([len(f.input_ids) - 1 for f in features], dtype=torch.long)
        batch["pair"] = torch.tensor([f.extra["pair"] for f in features], dtype=torch.long)
        return batch

    # --- evaluation -----------------------------------------------------------------------------------------------
    def best_checkpoints(self, cfg: Config) -> dict[str, tuple[str, str]]:
        return {"best_accuracy": ("token_accuracy", "max"), "best_calibration": ("calibration_error", "min")}

    def eval_name(self, ctx: EvalContext) -> str:
        """reliability_epoch_N at the end of epoch N, reliability_step_S elsewhere."""
        return f"reliability_epoch_{ctx.epoch}" if ctx.end_of_epoch else f"reliability_step_{ctx.step}"

    def evaluate(self, model, tokenizer, cfg: Config, rows: list[Row], ctx: EvalContext) -> dict[str, float]:
        qas = [r.values["_qa"] if "_qa" in r.values else raw_qa(r.values, r.values.get("dataset"), "dev", r.line)
               for r in rows]
        if not qas:
            return {}
        judged = judge(model, tokenizer, cfg, qas, ctx.device, cfg.eval_batch_size)
        names = list(dict.fromkeys(j.dataset for j in judged))
        per_dataset, reports = {}, {}
        for name in names:
            per_dataset[name], reports[name] = summarize([j for j in judged if j.dataset == name], cfg)
        average = {k: sum(m[k] for m in per_dataset.values()) / len(per_dataset) for k in per_dataset[names[0]]}
        average["n"] = float(len(judged))
        _, pooled = summarize(judged, cfg)

        stem = Path(ctx.out_dir) / self.eval_name(ctx)
        save_reliability_json({
            "step": ctx.step, "calibration_metric": cfg.calibration_metric, "confidence_loss": cfg.confidence_loss,
            "average": average, "datasets": {n: {"metrics": per_dataset[n], "calibration": reports[n]} for n in names},
            "all": pooled,
        }, stem.with_suffix(".json"))
        save_reliability_png(pooled["reliability"], stem.with_suffix(".png"))
        if len(names) > 1:
            for n in names:
                save_reliability_png(reports[n]["reliability"], stem.parent / f"{stem.name}_{_safe(n)}.png")
        print(f"\nconfidence tokens, step {ctx.step} ({stem.name}):\n{format_summary(per_dataset, average)}\n", flush=True)

        metrics = dict(average)
        for n in names:
            metrics.update({f"{n}/{k}": v for k, v in per_dataset[n].items()})
        return metrics

    # --- inference --------------------------------------------------------------------------------------------------
    def predictor(self, cfg: Config):
        return ConfidencePredictor(self, cfg)

    def model_card(self, cfg: Config) -> CardText:
        return CardText(summary="Answers followed by a confidence token (`<C_...>` / `<U_...>`: the answer is correct "
                                "or not), calibrated per data set.")
