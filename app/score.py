"""`python -m app score --pred FILE --gold FILE [--json OUT]`: the course scorer.

Predictions: the inference CSV (a `predicted_label` column) or a label-per-line file (one 0/1 per line, no header,
like the course's `.solution` files). Gold: a CSV or JSONL with a `label` column, or a label-per-line file. The format
is detected from the content: a first line that is just a 0/1 label means label-per-line. Rows are matched by
position; a length mismatch is an error, never a truncation. When both files have an `id` column, the ids must agree.

Prints the metrics as a table and as JSON; `--json OUT` also writes the JSON (atomically). Imports no torch.

Calibration: when the predictions carry a `confidence` column (the model's probability that its prediction is right,
in [0, 1]), the report gains `calibration`: app.metrics.calibration.calibration_report of the confidences against whether each
prediction matches its gold label (binned errors, ECE, Brier, reliability bins; `--n_bins`, `--calib_beta`).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from app.data import read_text, parse_binary_label, read_rows
from app.atomic import write_json_atomic
from app.errors import UserError
from app.metrics.classification import classification_metrics, format_table

__all__ = ["Labels", "read_labels", "run", "score_files", "write_json_atomic"]

_LABEL_LINE = re.compile(r"\s*[01](?:\.0)?\s*")
_FALSE_WORDS = {"false", "0", "no", "n"}


@dataclass
class Labels:
    path: Path
    values: list[int]
    lines: list[int]  # line of each label in its file, for messages
    fmt: str  # "lines", "csv" or "jsonl"
    ids: list[str] | None = None
    parse_failures: int | None = None  # rows with parse_ok false, when the file has that column
    confidence: list[float] | None = None  # the `confidence` column, when the file has one


def read_labels(path: str | Path, columns: tuple[str, ...], role: str) -> Labels:
    """Labels from a label-per-line file or a table; `columns` are the accepted label columns, first found wins."""
    path = Path(path)
    text = read_text(path)  # file exists, decodes (BOM stripped), is not blank
    first = next(line for line in text.splitlines() if line.strip())
    if _LABEL_LINE.fullmatch(first):
        return _read_label_lines(path, text)
    if first.lstrip().startswith("{") and path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise UserError(f"{path}:1: looks like JSON lines; name the file .jsonl (or give a CSV or one label per line)")

    rows = read_rows(path)
    column = next((c for c in columns if c in rows[0].values), None)
    fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    if column is None:
        have = ", ".join(rows[0].values) or "none"
        line = 1 if fmt == "csv" else rows[0].line  # the header names the columns
        raise UserError(f"{path}:{line}: {role} file needs a {' or '.join(columns)} column (columns found: {have})")
    values = [parse_binary_label(row.values[column], path, row.line, column) for row in rows]
    ids = [str(row.values.get("id", "")).strip() for row in rows] if "id" in rows[0].values else None
    failures = None
    if "parse_ok" in rows[0].values:
        failures = sum(str(row.values.get("parse_ok", "")).strip().lower() in _FALSE_WORDS for row in rows)
    confidence = None
    if "confidence" in rows[0].values:
        confidence = [_confidence(row.values.get("confidence"), path, row.line) for row in rows]
    return Labels(path, values, [row.line for row in rows], fmt, ids, failures, confidence)


def _confidence(value, path: Path, line: int) -> float:
    """A probability in [0, 1] from CSV text or JSON; anything else is an error naming the line."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise UserError(f"{path}:{line}: confidence must be a probability in [0, 1], found {value!r}")
    return number


def _read_label_lines(path: Path, text: str) -> Labels:
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are fine, blank lines between labels are not
        lines.pop()
    values: list[int] = []
    numbers: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise UserError(f"{path}:{number}: empty line in a label-per-line file (expected 0 or 1)")
        values.append(parse_binary_label(line, path, number, "label"))
        numbers.append(number)
    return Labels(path, values, numbers, "lines")


def score_files(pred_path: str | Path, gold_path: str | Path) -> tuple[dict, Labels, Labels]:
    """Metrics of the predictions in `pred_path` against the gold labels in `gold_path`."""
    gold = read_labels(gold_path, ("label",), "gold")
    pred = read_labels(pred_path, ("predicted_label", "label"), "predictions")
    if len(pred.values) != len(gold.values):
        raise UserError(
            f"{pred.path} has {len(pred.values)} predictions but {gold.path} has {len(gold.values)} gold labels; "
            "they must match row for row"
        )
    if pred.ids is not None and gold.ids is not None:
        for i, (p, g) in enumerate(zip(pred.ids, gold.ids)):
            if p != g:
                raise UserError(
                    f"{pred.path}:{pred.lines[i]}: id {p!r} does not match id {g!r} at {gold.path}:{gold.lines[i]}"
                )
    metrics = classification_metrics(gold.values, pred.values)
    return metrics, pred, gold


def calibration(pred: Labels, gold: Labels, n_bins: int = 10, calib_beta: int | None = None) -> dict:
    """Calibration of the prediction confidences against correctness (prediction == gold)."""
    from app.metrics.calibration import calibration_report

    for name, value in (("--n_bins", n_bins), ("--calib_beta", calib_beta)):
        if value is not None and value < 1:
            raise UserError(f"{name}={value}: must be at least 1")
    correct = [int(p == g) for p, g in zip(pred.values, gold.values)]
    return calibration_report(pred.confidence, correct, n_bins=n_bins, calib_beta=calib_beta)


_CALIBRATION_ROWS = {"mean_confidence": "mean confidence", "accuracy": "share of correct predictions",
                     "ece_l1": "ECE (equal-width, L1)", "ece_max": "MCE (equal-width, max)",
                     "ce_l2_debiased": "calibration error (L2, debiased)", "ce_l1_plugin": "calibration error (L1)",
                     "brier": "Brier score"}


def format_calibration(report: dict) -> str:
    width = max(len(v) for v in _CALIBRATION_ROWS.values())
    lines = ["", f"{'calibration':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{label:<{width}}  {report[key]:.4f}" for key, label in _CALIBRATION_ROWS.items()]
    return "\n".join(lines)


def run(pred_path: str, gold_path: str, json_out: str | None = None, n_bins: int = 10,
        calib_beta: int | None = None) -> int:
    """Score, print the table and the JSON report, write it to `json_out` when given; returns the exit code."""
    metrics, pred, _gold = score_files(pred_path, gold_path)
    report = dict(metrics)
    if pred.parse_failures is not None:
        report["parse_failures"] = pred.parse_failures
    print(format_table(metrics))
    if pred.parse_failures:
        print(f"({pred.parse_failures} of {metrics['n']} predictions were not parsed from the model's JSON)")
    if pred.confidence is not None:
        report["calibration"] = calibration(pred, _gold, n_bins, calib_beta)
        print(format_calibration(report["calibration"]))
    print(json.dumps(report, indent=2))
    if json_out:
        write_json_atomic(json_out, report)
        print(f"wrote {json_out}", file=sys.stderr)
    return 0
