"""NLI inference: `python -m app infer INPUT [--checkpoint DIR] [--output FILE] [--fresh] [--examples N] [--key=value]`.

Input: a CSV or JSONL file with `premise` and `hypothesis` columns (extra columns are fine; a `label` column turns
on metrics, an `id` column is copied to the output).

Checkpoint and config: see app/runs.py (a checkpoint or run directory, else the newest run under checkpoints/; the
checkpoint's run_config.json, then `--key=value` overrides, e.g. `--infer_batch_size=8 --max_new_tokens=64`).

Outputs. `--output` defaults to `predictions.csv` in the current directory. Next to it, for `--output DIR/NAME.csv`:
  DIR/NAME.csv               one row per input row, in input order: index (0-based input row), id (when the input
                             has one), predicted_label (0/1), thought_process, parse_ok (false: no JSON object in the
                             generation held the label; it came from a `predicted_label: x` pair in the text or, where
                             there was none, from the forced-prefix fallback)
  DIR/NAME.solution          one 0/1 per line, no header (the course's gold `.solution` shape)
  DIR/NAME.metrics.json      metrics (when the input has labels) and the counts: parse fallbacks, truncated prompts,
                             generations that never closed their JSON object
  DIR/NAME.csv.partial.jsonl work in progress (app.runs.PartialFile), removed at the end
All final files are written to a temporary file and renamed into place. A field holding quotes, commas, newlines or
a bare carriage return is quoted, so the CSV reads back through `score` and as an `infer` input.

Resume. Every finished batch is appended to the partial file and fsynced. Re-running the same command skips the
batches already there and the final files equal those of an uninterrupted run. A partial file written for another
input, checkpoint or config (all but `infer_batch_size`) is discarded with a warning; `--fresh` discards it always.

Long fields. A prompt may use `max_seq_length - max_new_tokens` tokens; longer premises/hypotheses are cut by tokens
(the longer field first) and counted in a warning, never an error.

Backends. `backend="hf"` (default): transformers, length-sorted batches of `infer_batch_size`, greedy, stopping when
the JSON object closes. `backend="vllm"` (GPU, `pip install 'finetune-runner[vllm]'`): the checkpoint is served by
vLLM, a LoRA adapter directly through a `LoRARequest` on its base model (a quantized base is loaded unquantized); the
same extraction and fallback apply (app.tasks.nli_cot.backends).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from app.atomic import write_atomic, write_json_atomic
from app.data import csv_text, parse_binary_label, read_rows
from app.errors import UserError
from app.lm.modeling import load_for_inference, load_tokenizer
from app.metrics.classification import classification_metrics, format_table
from app.tasks.nli_cot.backends import hf_batches, no_vllm, vllm_batches
from app.tasks.nli_cot.extract import json_object_closed
from app.tasks.nli_cot.prompts import build_prompt

_TEXT_COLUMNS = ("premise", "hypothesis")

# --- input ---------------------------------------------------------------------------------------------------------
@dataclass
class InputData:
    path: Path
    values: list[dict]  # premise/hypothesis as text, one dict per row, input order
    lines: list[int]
    labels: list[int] | None  # gold labels when the input has a filled label column
    ids: list[str] | None

    def __len__(self) -> int:
        return len(self.values)


def load_input(path: str | Path) -> InputData:
    path = Path(path)
    rows = read_rows(path, _TEXT_COLUMNS)
    values = []
    for row in rows:
        v = dict(row.values)
        for col in _TEXT_COLUMNS:
            x = v.get(col)
            if x is None:
                x = ""
            elif isinstance(x, (int, float)):
                x = str(x)
            elif not isinstance(x, str):
                raise UserError(f"{path}:{row.line}: {col} must be text, found {type(x).__name__}")
            v[col] = x
        values.append(v)
    labels = None
    if "label" in rows[0].values:
        raw = [row.values.get("label") for row in rows]
        if any(x is not None and str(x).strip() for x in raw):
            labels = [parse_binary_label(x, path, row.line) for x, row in zip(raw, rows)]
    ids = None
    if "id" in rows[0].values:
        ids = ["" if row.values.get("id") is None else str(row.values.get("id")) for row in rows]
    return InputData(path, values, [row.line for row in rows], labels, ids)



# --- prompt budget -------------------------------------------------------------------------------------------------
def _share(a: int, b: int, room: int) -> tuple[int, int]:
    """Tokens kept of two fields of a and b tokens within `room`: the shorter keeps all it can, up to half."""
    if a + b <= room:
        return a, b
    half = room // 2
    if a <= half:
        return a, room - a
    if b <= half:
        return room - b, b
    return room - half, half


def _cut(text: str, tokenizer, keep: int) -> str:
    if keep <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if len(enc.input_ids) <= keep:
            return text
        return text[: enc.offset_mapping[keep - 1][1]]
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    return text if len(ids) <= keep else tokenizer.decode(ids[:keep], skip_special_tokens=True)


def fit_prompts(values: list[dict], tokenizer, cfg) -> list[bool]:
    """Cut premise/hypothesis (in place) so that each prompt fits max_seq_length - max_new_tokens tokens.

    Returns, per row, whether it was cut.
    """
    budget = cfg.max_seq_length - cfg.max_new_tokens
    empty = len(tokenizer(build_prompt({"premise": "", "hypothesis": ""}, cfg), verbose=False).input_ids)
    if budget < empty + 2:
        raise UserError(
            f"max_seq_length={cfg.max_seq_length} - max_new_tokens={cfg.max_new_tokens} leaves {budget} prompt tokens, "
            f"but the prompt template alone takes {empty}; raise max_seq_length or lower max_new_tokens"
        )
    char_cap = 64 * budget  # no real token is 64 characters long: a longer field is over budget anyway
    cut = [False] * len(values)
    for i, v in enumerate(values):
        for col in _TEXT_COLUMNS:
            if len(v[col]) > char_cap:
                v[col], cut[i] = v[col][:char_cap], True
    lengths = [len(ids) for ids in tokenizer([build_prompt(v, cfg) for v in values], verbose=False).input_ids]
    for i, v in enumerate(values):
        if lengths[i] <= budget:
            continue
        cut[i] = True
        sizes = [len(tokenizer(v[c], add_special_tokens=False, verbose=False).input_ids) for c in _TEXT_COLUMNS]
        room = budget - empty
        for _ in range(16):  # tokens can merge across a cut: shrink until the whole prompt fits
            keep = _share(sizes[0], sizes[1], max(room, 0))
            trial = {**v, **{c: _cut(v[c], tokenizer, k) for c, k in zip(_TEXT_COLUMNS, keep)}}
            total = len(tokenizer(build_prompt(trial, cfg), verbose=False).input_ids)
            if total <= budget or room <= 0:
                break
            room -= max(total - budget, 1)
        v.update({c: trial[c] for c in _TEXT_COLUMNS})
    return cut


# --- outputs -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputPaths:
    predictions: Path
    solution: Path
    metrics: Path
    partial: Path

    @property
    def main(self) -> Path:
        return self.predictions

    @classmethod
    def for_output(cls, output: str | Path) -> "OutputPaths":
        out = Path(output)
        stem = out.with_suffix("") if out.suffix else out
        paths = cls(out, stem.with_name(stem.name + ".solution"), stem.with_name(stem.name + ".metrics.json"),
                    out.with_name(out.name + ".partial.jsonl"))
        if out.suffix.lower() in (".solution", ".jsonl") or out.name.endswith(".metrics.json"):
            raise UserError(f"--output {out}: give the predictions CSV path (e.g. predictions.csv)")
        return paths


def predictions_csv(records: list[dict], ids: list[str] | None) -> str:
    head = ["index"] + (["id"] if ids is not None else []) + ["predicted_label", "thought_process", "parse_ok"]
    rows = ([i] + ([ids[i]] if ids is not None else []) + [r["label"], r["thought"], "true" if r["parse_ok"] else "false"]
            for i, r in enumerate(records))
    return csv_text(head, rows)


# --- reporting -----------------------------------------------------------------------------------------------------
def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def examples_table(values: list[dict], records: list[dict], labels: list[int] | None, k: int = 5) -> str:
    """A few rows for a human: premise, hypothesis, thought, label (and gold), clipped to the terminal width."""
    cols = shutil.get_terminal_size((120, 24)).columns
    fixed = 5 + 6 + (5 if labels is not None else 0) + 8  # "#", label, gold and the gaps
    room = max(cols - fixed, 60)
    wp, wh = room * 3 // 10, room * 25 // 100
    wt = room - wp - wh
    head = ["#", "premise", "hypothesis", "thought", "label"] + (["gold"] if labels is not None else [])
    rows = []
    for i in range(min(k, len(records))):
        r = [str(i), _clip(values[i]["premise"], wp), _clip(values[i]["hypothesis"], wh),
             _clip(records[i]["thought"], wt), str(records[i]["label"]) + ("" if records[i]["parse_ok"] else "*")]
        rows.append(r + ([str(labels[i])] if labels is not None else []))
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    if any(not records[i]["parse_ok"] for i in range(min(k, len(records)))):
        lines.append("* label from the forced-prefix fallback (the generation did not parse)")
    return "\n".join(lines)


# --- the predictor -------------------------------------------------------------------------------------------------
class NliPredictor:
    """What `infer` runs for an nli_cot checkpoint (protocol: app.tasks.protocol.Predictor)."""

    default_output = "predictions.csv"
    verb = "infer"

    def __init__(self, cfg):
        if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise no_vllm()

    def fingerprint_parts(self, cfg) -> dict:
        return {}

    def read_input(self, path: Path, cfg) -> InputData:
        return load_input(path)

    def output_paths(self, output: Path) -> OutputPaths:
        return OutputPaths.for_output(output)

    def load(self, checkpoint: Path, cfg, device):
        if cfg.backend == "vllm":
            return {"checkpoint": checkpoint, "model": None, "tokenizer": load_tokenizer(cfg, str(checkpoint))}
        model, tokenizer = load_for_inference(checkpoint, cfg, device)
        return {"checkpoint": checkpoint, "model": model, "tokenizer": tokenizer}

    def predict(self, state, cfg, data: InputData, device, skip):
        values = [dict(v) for v in data.values]
        tokenizer = state["tokenizer"]
        cut = fit_prompts(values, tokenizer, cfg)
        if any(cut):
            print(f"warning: {data.path}: {sum(cut)} row(s) cut to the prompt budget of "
                  f"{cfg.max_seq_length - cfg.max_new_tokens} tokens (max_seq_length - max_new_tokens), e.g. line "
                  f"{data.lines[cut.index(True)]}", file=sys.stderr)
        if cfg.backend == "vllm":
            batches = vllm_batches(cfg, state["checkpoint"], tokenizer, values, skip)
        else:
            batches = hf_batches(state["model"], tokenizer, cfg, values, device, cfg.infer_batch_size, skip=skip)
        for batch, preds in batches:
            yield [{"i": i, "label": int(p.label), "thought": p.thought or "", "parse_ok": bool(p.parse_ok),
                    "how": p.how, "closed": json_object_closed(p.generation or ""), "cut": cut[i]}
                   for i, p in zip(batch, preds)]

    def finish(self, data: InputData, records: list[dict], paths: OutputPaths, summary: dict, examples: int) -> dict:
        n = len(records)
        summary.update({"parse_failures": sum(not r["parse_ok"] for r in records),
                        "prompts_truncated": sum(r["cut"] for r in records),
                        "unclosed_generations": sum(not r["closed"] for r in records)})
        if data.labels is not None:
            summary["metrics"] = classification_metrics(data.labels, [r["label"] for r in records])
        write_atomic(paths.predictions, predictions_csv(records, data.ids))
        write_atomic(paths.solution, "".join(f"{r['label']}\n" for r in records))
        write_json_atomic(paths.metrics, summary)
        if examples > 0:
            print(examples_table(data.values, records, data.labels, examples))
            print()
        if data.labels is not None:
            print(format_table(summary["metrics"]))
        print(f"parse fallbacks: {summary['parse_failures']} of {n} rows (label from the forced-prefix fallback)")
        print(f"truncated prompts: {summary['prompts_truncated']}; generations without a closed JSON object: "
              f"{summary['unclosed_generations']}")
        print(f"wrote {paths.predictions}, {paths.solution}, {paths.metrics}", file=sys.stderr)
        return summary
