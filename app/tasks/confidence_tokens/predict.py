"""Inference of a confidence_tokens checkpoint: `python -m app infer QUESTIONS [--checkpoint DIR] [--output FILE]`.

Input: a CSV or JSONL file of raw questions as validation reads them (app/tasks/confidence_tokens/qa.py), the answer
optional: `question` with an optional `passage` (yes/no, BoolQ style), or `question` with `options` (or columns A, B,
...) for multiple choice. The token pair is the row's `dataset` column's, else that of the first dataset in
`confidence_tokens`. An `answer` column (as validation reads it) adds `gold` and `correct` columns and the
validation metrics; an `id` column is copied.

Prediction is the validation's own (`judge` in judge.py): greedy answer, answer parsing, and at the position after the
answer `confidence = p(C) / (p(C) + p(U))`, the model's probability that its answer is right.

Outputs, for `--output DIR/NAME.csv` (default `predictions.csv`), written atomically:
  DIR/NAME.csv               one row per input row, in input order: index, id (when the input has one), dataset,
                             answer (parsed: yes / no or an option letter; empty when nothing parsed), response (the
                             generated answer text), token (the confidence token predicted: the one generated
                             (`full_vocab`) or the likelier of the pair (`pair`); empty when none was generated),
                             confidence, and with answers gold and correct
  DIR/NAME.metrics.json      counts, and with answers the validation metrics (summarize in judge.py)
  DIR/NAME.csv.partial.jsonl finished batches, so a re-run continues (app.runs.PartialFile); removed at the end
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from app.atomic import write_atomic, write_json_atomic
from app.data import csv_text
from app.errors import UserError
from app.lm.modeling import load_for_inference
from app.tasks.confidence_tokens.judge import Judged, judge, summarize
from app.tasks.confidence_tokens.qa import QA, domain_tokens, read_raw_qa

DEFAULT_OUTPUT = "predictions.csv"
DIGITS = 6  # confidence as written: what `infer` and the demo page both show


@dataclass
class Questions:
    """The questions of an input file, in input order."""

    path: Path
    qas: list[QA]
    ids: list[str] | None

    def __len__(self) -> int:
        return len(self.qas)

    @property
    def answered(self) -> bool:
        return all(q.gold for q in self.qas)


@dataclass(frozen=True)
class CsvOutputs:
    main: Path
    metrics: Path
    partial: Path

    @classmethod
    def for_output(cls, output: Path) -> "CsvOutputs":
        out = Path(output)
        if out.suffix.lower() == ".jsonl" or out.name.endswith(".metrics.json"):
            raise UserError(f"--output {out}: give the predictions CSV path (e.g. {DEFAULT_OUTPUT})")
        stem = out.with_suffix("") if out.suffix else out
        return cls(out, stem.with_name(stem.name + ".metrics.json"), out.with_name(out.name + ".partial.jsonl"))


def read_questions(path: Path, cfg) -> Questions:
    pairs = domain_tokens(cfg)
    parsed = read_raw_qa(path, None, pairs, fallback=next(iter(pairs)), need_answer=False, required=("question",))
    rows = [row for row, _, _ in parsed]
    ids = None
    if "id" in rows[0].values:
        ids = ["" if row.values.get("id") is None else str(row.values["id"]) for row in rows]
    return Questions(path, [qa for _, _, qa in parsed], ids)


def record(i: int, judged) -> dict:
    """A partial-file record (JSON): the Judged fields, the confidence rounded as it is written."""
    rec = dataclasses.asdict(judged)
    rec["p_confident"] = round(rec["p_confident"], DIGITS)
    return {"i": i, **rec}


def predictions_csv(data: Questions, records: list[dict]) -> str:
    gold = data.answered
    head = ["index"] + (["id"] if data.ids is not None else []) + ["dataset", "answer", "response", "token"]
    head += ["confidence"] + (["gold", "correct"] if gold else [])
    rows = []
    for i, r in enumerate(records):
        row = [i] + ([data.ids[i]] if data.ids is not None else [])
        row += [r["dataset"], r["answer"] or "", r["text"], r["predicted"] or "", r["p_confident"]]
        rows.append(row + ([r["gold"], "true" if r["correct"] else "false"] if gold else []))
    return csv_text(head, rows)


class ConfidencePredictor:
    """What `infer` (and the demo page) run for a confidence_tokens checkpoint (app.tasks.protocol.Predictor)."""

    default_output = DEFAULT_OUTPUT
    verb = "answer"

    def __init__(self, task, cfg):
        self.task, self.cfg = task, cfg  # finish() summarises with the config's calibration settings

    def fingerprint_parts(self, cfg) -> dict:
        return {}

    def read_input(self, path: Path, cfg) -> Questions:
        return read_questions(Path(path), cfg)

    def output_paths(self, output: Path) -> CsvOutputs:
        return CsvOutputs.for_output(output)

    def load(self, checkpoint: Path, cfg, device):
        return load_for_inference(checkpoint, cfg, device)

    def predict(self, state, cfg, data: Questions, device, skip):
        model, tokenizer = state
        step = cfg.infer_batch_size
        for start in range(0, len(data), step):  # chunks in input order: the partial file resumes by chunk
            batch = list(range(start, min(start + step, len(data))))
            if skip is not None and skip(batch):
                continue
            judged = judge(model, tokenizer, cfg, [data.qas[i] for i in batch], device, step)
            yield [record(i, j) for i, j in zip(batch, judged)]

    def finish(self, data: Questions, records: list[dict], paths: CsvOutputs, summary: dict, examples: int) -> dict:
        summary.update(unparsed_answers=sum(r["answer"] is None for r in records),
                       tokens_emitted=sum(r["emitted"] is not None for r in records))
        if data.answered and records:
            summary["metrics"], _ = summarize([Judged(**{k: v for k, v in r.items() if k != "i"}) for r in records],
                                              self.cfg)
        write_atomic(paths.main, predictions_csv(data, records))
        write_json_atomic(paths.metrics, summary)
        print(f"{len(records)} questions answered ({summary['unparsed_answers']} answers did not parse)")
        print(f"wrote {paths.main}, {paths.metrics}", file=sys.stderr)
        return summary
