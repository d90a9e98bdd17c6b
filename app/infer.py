"""`python -m app infer INPUT [--checkpoint DIR] [--output FILE] [--fresh] [--examples N] [--key=value ...]`.

Batched inference of a trained checkpoint on a CSV or JSONL file with `premise` and `hypothesis` columns (extra
columns are fine; a `label` column turns on metrics, an `id` column is copied to the output).

Checkpoint. `--checkpoint` takes a checkpoint directory (`checkpoints/RUN/checkpoints/final`) or a run directory
(`checkpoints/RUN`). Without it, the run under `checkpoints/*/` whose newest complete checkpoint was written last is
chosen, and within that run `final`, else `best`, else the highest `step_*`; the choice is printed. A checkpoint is
complete when it holds `trainer_state.json` (written last) and `run_config.json`.

Config. The checkpoint's `run_config.json` (validated as `app.config.Config`), then `--key=value` overrides, e.g.
`--infer_batch_size=8 --max_new_tokens=64 --backend=vllm`.

Outputs. `--output` defaults to `predictions.csv` in the current directory. Next to it, for `--output DIR/NAME.csv`:
  DIR/NAME.csv               one row per input row, in input order: index (0-based input row), id (when the input
                             has one), predicted_label (0/1), thought_process, parse_ok (false: no JSON object in the
                             generation held the label; it came from a `predicted_label: x` pair in the text or, where
                             there was none, from the forced-prefix fallback)
  DIR/NAME.solution          one 0/1 per line, no header (the course's gold `.solution` shape)
  DIR/NAME.metrics.json      metrics (when the input has labels) and the counts: parse fallbacks, truncated prompts,
                             generations that never closed their JSON object
  DIR/NAME.csv.partial.jsonl work in progress, removed at the end
All final files are written to a temporary file and renamed into place.

Resume. Every finished batch is appended to the partial file and fsynced. Re-running the same command skips the
batches already there and the final files equal those of an uninterrupted run. The partial file starts with a
fingerprint of the input bytes, the checkpoint's files and the config (all but `infer_batch_size`, so a smaller batch
after an out-of-memory error still resumes); a partial file with another fingerprint is discarded with a warning.
`--fresh` discards it always.

Long fields. A prompt may use `max_seq_length - max_new_tokens` tokens; longer premises/hypotheses are cut by tokens
(the longer field first) and counted in a warning, never an error.

Backends. `backend="hf"` (default): transformers, length-sorted batches of `infer_batch_size`, greedy, stopping when
the JSON object closes. `backend="vllm"` (GPU, `pip install vllm`): the checkpoint is served by vLLM, a LoRA adapter
directly through a `LoRARequest` on its base model (a quantized base is loaded unquantized); the same extraction and
fallback apply.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.config import FIELDS, Config, parse_override
from app.data import parse_binary_label, read_rows
from app.atomic import write_atomic
from app.errors import UserError
from app.metrics.classification import classification_metrics, format_table

log = logging.getLogger("app.infer")

DEFAULT_OUTPUT = "predictions.csv"
CHECKPOINT_ROOT = Path("checkpoints")
PARTIAL_FORMAT = "app.infer.partial/1"
_STEP = re.compile(r"^step_(\d+)$")
_TEXT_COLUMNS = ("premise", "hypothesis")


# --- checkpoint choice ---------------------------------------------------------------------------------------------
def _is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / "run_config.json").is_file()


def _complete_checkpoints(run_checkpoints: Path) -> list[Path]:
    if not run_checkpoints.is_dir():
        return []
    return [p for p in run_checkpoints.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_complete(p)]


def _preferred(checkpoints: list[Path]) -> Path | None:
    """final, else best (else the newest best_*), else the highest step_*, else any (newest written)."""
    by_name = {p.name: p for p in checkpoints}
    for name in ("final", "best"):
        if name in by_name:
            return by_name[name]
    bests = [p for p in checkpoints if p.name.startswith("best")]
    if bests:
        return max(bests, key=_written_at)
    steps = [p for p in checkpoints if _STEP.match(p.name)]
    if steps:
        return max(steps, key=lambda p: int(_STEP.match(p.name).group(1)))
    return max(checkpoints, key=_written_at, default=None)


def _written_at(checkpoint: Path) -> float:
    return (checkpoint / "trainer_state.json").stat().st_mtime


def find_checkpoint(root: str | Path = CHECKPOINT_ROOT) -> Path:
    """The preferred checkpoint of the run under `root` whose newest complete checkpoint was written last."""
    root = Path(root)
    runs = []
    if root.is_dir():
        for run in root.iterdir():
            found = _complete_checkpoints(run / "checkpoints")
            if found:
                runs.append((max(map(_written_at, found)), run.name, found))
    if not runs:
        raise UserError(
            f"no complete checkpoint under {root}/*/checkpoints/; train one first "
            "(python -m app train configs/tiny.py) or pass --checkpoint DIR"
        )
    _, _, found = max(runs, key=lambda r: (r[0], r[1]))
    return _preferred(found)


def resolve_checkpoint(arg: str | None, root: str | Path = CHECKPOINT_ROOT) -> tuple[Path, str]:
    """(checkpoint directory, why it was chosen)."""
    if arg is None:
        return find_checkpoint(root), f"the newest run under {Path(root)}/; pass --checkpoint DIR for another"
    path = Path(arg)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if (path / "run_config.json").is_file() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        return path, "given"
    for run_checkpoints in (path / "checkpoints", path):
        chosen = _preferred(_complete_checkpoints(run_checkpoints))
        if chosen is not None:
            return chosen, f"preferred checkpoint of {path} (final, then best, then the newest step)"
    raise UserError(f"{path}: not a checkpoint (no run_config.json with model or adapter files) and holds none")


# --- config --------------------------------------------------------------------------------------------------------
def checkpoint_config(checkpoint: Path, overrides: list[str] = ()) -> Config:
    """The run config saved in the checkpoint, with `--key=value` overrides, validated."""
    from pydantic import ValidationError

    path = checkpoint / "run_config.json"
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read the run config ({err})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object")
    problems, where = [], {k: str(path) for k in values}
    for arg in overrides:
        name, value = parse_override(arg)
        if name not in FIELDS:
            import difflib

            close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.5)
            problems.append(f"unknown config key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        values[name], where[name] = value, "command line"
    for key, value in values.items():
        if key in Config.model_fields and Config.model_fields[key].annotation in (float, float | None) and type(value) is int:
            values[key] = float(value)
    if not problems:
        try:
            return Config(**values)
        except ValidationError as err:
            for e in err.errors():
                key = str(e["loc"][0]) if e["loc"] else "?"
                problems.append(f"{where.get(key, path)}: {key}={e.get('input')!r}: {e['msg'].lower()}")
    raise UserError("invalid config: " + "; ".join(problems))


# --- input ---------------------------------------------------------------------------------------------------------
@dataclass
class InputData:
    path: Path
    values: list[dict]  # premise/hypothesis as text, one dict per row, input order
    lines: list[int]
    labels: list[int] | None  # gold labels when the input has a filled label column
    ids: list[str] | None


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


def fit_prompts(values: list[dict], tokenizer, cfg: Config) -> list[bool]:
    """Cut premise/hypothesis (in place) so that each prompt fits max_seq_length - max_new_tokens tokens.

    Returns, per row, whether it was cut.
    """
    from app.tasks.nli_cot.task import build_prompt

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

    @classmethod
    def for_output(cls, output: str | Path) -> "OutputPaths":
        out = Path(output)
        stem = out.with_suffix("") if out.suffix else out
        paths = cls(out, stem.with_name(stem.name + ".solution"), stem.with_name(stem.name + ".metrics.json"),
                    out.with_name(out.name + ".partial.jsonl"))
        if out.suffix.lower() in (".solution", ".jsonl") or out.name.endswith(".metrics.json"):
            raise UserError(f"--output {out}: give the predictions CSV path (e.g. predictions.csv)")
        return paths


_write_text_atomic = write_atomic  # kept for callers of this module


def predictions_csv(records: list[dict], ids: list[str] | None) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index"] + (["id"] if ids is not None else []) + ["predicted_label", "thought_process", "parse_ok"])
    for i, r in enumerate(records):
        row = [i] + ([ids[i]] if ids is not None else []) + [r["label"], r["thought"], "true" if r["parse_ok"] else "false"]
        writer.writerow(row)
    return buf.getvalue()


# --- resumable partial file ----------------------------------------------------------------------------------------
def fingerprint(input_path: Path, checkpoint: Path, cfg: Config) -> str:
    """Identity of what the predictions depend on: input bytes, checkpoint files, config (but the batch size)."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(input_path.read_bytes()).digest())
    h.update(str(checkpoint.resolve()).encode())
    for f in sorted(checkpoint.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    settings = {k: v for k, v in cfg.model_dump().items() if k != "infer_batch_size"}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class PartialFile:
    """Append-only JSON lines: a header with the fingerprint, then one line of records per finished batch."""

    def __init__(self, path: Path, fp: str, n_rows: int, fresh: bool = False):
        self.path, self.fp, self.n_rows = path, fp, n_rows
        self.done: dict[int, dict] = {}
        good_end = self._load() if not fresh and path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        if good_end is None:
            self.done = {}
            self.handle = open(path, "w", encoding="utf-8")
            self._append({"format": PARTIAL_FORMAT, "fingerprint": fp, "rows": n_rows})
        else:
            self.handle = open(path, "r+", encoding="utf-8")
            self.handle.seek(good_end)
            self.handle.truncate()  # a line torn by a kill is dropped, and redone

    def _load(self) -> int | None:
        """Byte offset after the last intact line; None when the file is not ours to continue."""
        with open(self.path, "rb") as f:
            data = f.read()
        pos, header = 0, None
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break  # no newline: torn
            try:
                obj = json.loads(data[pos:end])
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if header is None:
                header = obj
                if not (isinstance(obj, dict) and obj.get("format") == PARTIAL_FORMAT and obj.get("fingerprint") == self.fp
                        and obj.get("rows") == self.n_rows):
                    print(f"warning: {self.path} was written for another input, checkpoint or config: starting over",
                          file=sys.stderr)
                    return None
            else:
                for rec in obj.get("records", []):
                    if isinstance(rec.get("i"), int) and 0 <= rec["i"] < self.n_rows:
                        self.done.setdefault(rec["i"], rec)
            pos = end + 1
        return pos if header is not None else None

    def _append(self, obj) -> None:
        self.handle.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def add(self, records: list[dict]) -> list[dict]:
        new = [r for r in records if r["i"] not in self.done]
        if new:
            self._append({"records": new})
            for r in new:
                self.done[r["i"]] = r
        return new

    def close(self) -> None:
        self.handle.close()


# --- prediction backends -------------------------------------------------------------------------------------------
Batches = Iterator[tuple[list[int], list]]  # (row indices, list[Prediction])


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hf_predictions(task, model, tokenizer, cfg: Config, values: list[dict], skip: Callable[[list[int]], bool]) -> Batches:
    yield from task.predict_batches(model, tokenizer, cfg, values, _device(), cfg.infer_batch_size, skip=skip)


_NO_VLLM = "backend='vllm' needs vLLM, which is not installed: pip install vllm (needs a GPU), or use --backend=hf"
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 512)


def vllm_predictions(cfg: Config, checkpoint: Path, tokenizer, values: list[dict],
                     skip: Callable[[list[int]], bool]) -> Batches:
    """Greedy generation with vLLM in chunks of input order (for resume); a LoRA checkpoint is served as an adapter."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise UserError(_NO_VLLM) from None
    from app.tasks.nli_cot.extract import extract_label
    from app.lm.modeling import is_adapter_dir
    from app.tasks.nli_cot.task import Prediction, build_prompt

    adapter = is_adapter_dir(checkpoint)
    llm = LLM(
        model=cfg.model_name if adapter else str(checkpoint),
        tokenizer=str(checkpoint),
        dtype="auto" if cfg.dtype == "auto" else cfg.dtype,
        max_model_len=cfg.max_seq_length,
        enable_lora=adapter,
        max_lora_rank=next((r for r in _VLLM_RANKS if r >= cfg.lora_r), cfg.lora_r),
        seed=cfg.seed,
        trust_remote_code=cfg.trust_remote_code,
    )
    lora = LoRARequest("checkpoint", 1, str(checkpoint.resolve())) if adapter else None
    greedy = SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens)
    # fallback: the likelier of the first tokens of "0" and "1" after a forced `"predicted_label": ` prefix
    head = tokenizer('"predicted_label": ', add_special_tokens=False).input_ids
    label_ids = []
    for digit in "01":
        full = tokenizer('"predicted_label": ' + digit, add_special_tokens=False).input_ids
        label_ids.append(full[next((k for k, (a, b) in enumerate(zip(head, full)) if a != b), len(head))])
    forced = SamplingParams(temperature=0.0, max_tokens=1, allowed_token_ids=label_ids)

    prompts = [build_prompt(v, cfg) for v in values]
    chunk = max(cfg.infer_batch_size, 256)
    for start in range(0, len(prompts), chunk):
        batch = list(range(start, min(start + chunk, len(prompts))))
        if skip(batch):
            continue
        outs = llm.generate([prompts[i] for i in batch], greedy, lora_request=lora, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        found = [extract_label(t) for t in texts]
        preds = [Prediction(e.label, e.thought, e.ok, e.how, t) for e, t in zip(found, texts)]
        missing = [k for k, p in enumerate(preds) if p.label is None]
        if missing:
            prefixes = []
            for k in missing:
                t = preds[k].thought
                obj = '{"thought_process": ' + json.dumps(t, ensure_ascii=False) + ", " if t else "{"
                prefixes.append(prompts[batch[k]] + obj + '"predicted_label": ')
            outs = llm.generate(prefixes, forced, lora_request=lora, use_tqdm=False)
            for k, o in zip(missing, outs):
                preds[k].label = int(o.outputs[0].token_ids[0] == label_ids[1])
                preds[k].parse_ok, preds[k].how = False, "forced_prefix"
        yield batch, preds


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


# --- the run -------------------------------------------------------------------------------------------------------
def run(input_path: str | Path, checkpoint: str | None = None, output: str | Path = DEFAULT_OUTPUT,
        overrides: list[str] = (), fresh: bool = False, examples: int = 5, checkpoint_root: str | Path = CHECKPOINT_ROOT,
        progress: bool = True) -> dict:
    """Predict every row of `input_path`; write the outputs; return the summary (also saved as the metrics JSON)."""
    data = load_input(input_path)  # bad input fails before any model loads
    paths = OutputPaths.for_output(output)
    if paths.predictions.resolve() == data.path.resolve():
        raise UserError(f"--output {paths.predictions} is the input file; choose another path")
    ckpt, why = resolve_checkpoint(checkpoint, checkpoint_root)
    print(f"checkpoint: {ckpt} ({why})", file=sys.stderr)
    cfg = checkpoint_config(ckpt, list(overrides))
    from app.tasks import get_task

    task = get_task(cfg.task)
    if not hasattr(task, "predict_batches"):
        raise UserError(f"task={cfg.task!r} has no generation step to run inference with")
    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError(_NO_VLLM)

    n = len(data.values)
    partial = PartialFile(paths.partial, fingerprint(data.path, ckpt, cfg), n, fresh=fresh)
    started, t0 = len(partial.done), time.perf_counter()
    if 0 < started < n:
        print(f"resuming: {started} of {n} rows already predicted in {paths.partial}", file=sys.stderr)
    try:
        if len(partial.done) < n:
            _predict_missing(task, cfg, ckpt, data, partial, progress)
        else:
            print(f"{paths.partial}: all {n} rows already predicted", file=sys.stderr)
    finally:
        partial.close()
    elapsed = time.perf_counter() - t0
    records = [partial.done[i] for i in range(n)]

    summary: dict = {"input": str(data.path), "checkpoint": str(ckpt), "rows": n,
                     "parse_failures": sum(not r["parse_ok"] for r in records),
                     "prompts_truncated": sum(r["cut"] for r in records),
                     "unclosed_generations": sum(not r["closed"] for r in records),
                     "rows_predicted_now": n - started,
                     "rows_per_s": round((n - started) / elapsed, 2) if elapsed > 0 and n > started else None}
    if data.labels is not None:
        summary["metrics"] = classification_metrics(data.labels, [r["label"] for r in records])
    _write_text_atomic(paths.predictions, predictions_csv(records, data.ids))
    _write_text_atomic(paths.solution, "".join(f"{r['label']}\n" for r in records))
    from app.score import write_json_atomic

    write_json_atomic(paths.metrics, summary)
    paths.partial.unlink(missing_ok=True)

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


def _predict_missing(task, cfg: Config, ckpt: Path, data: InputData, partial: PartialFile, progress: bool) -> None:
    from tqdm import tqdm

    from app.tasks.nli_cot.extract import json_object_closed

    values = [dict(v) for v in data.values]
    if cfg.backend == "vllm":
        from app.lm.modeling import load_tokenizer

        tokenizer = load_tokenizer(cfg, str(ckpt))
        model = None
    else:
        from app.lm.modeling import load_for_inference

        from app.lm.modeling import is_adapter_dir

        if cfg.create_tiny_model and is_adapter_dir(ckpt) and not (Path(cfg.model_name) / "config.json").is_file():
            from app.lm.tiny import ensure_tiny_model

            ensure_tiny_model(cfg.model_name)  # an adapter over the embedded tiny model: its base is rebuilt as trained
        model, tokenizer = load_for_inference(ckpt, cfg, _device())
    cut = fit_prompts(values, tokenizer, cfg)
    if any(cut):
        print(f"warning: {data.path}: {sum(cut)} row(s) cut to the prompt budget of "
              f"{cfg.max_seq_length - cfg.max_new_tokens} tokens (max_seq_length - max_new_tokens), e.g. line "
              f"{data.lines[cut.index(True)]}", file=sys.stderr)

    def skip(batch: list[int]) -> bool:
        return all(i in partial.done for i in batch)

    if cfg.backend == "vllm":
        batches = vllm_predictions(cfg, ckpt, tokenizer, values, skip)
    else:
        batches = hf_predictions(task, model, tokenizer, cfg, values, skip)
    n = len(values)
    bar = tqdm(total=n, initial=len(partial.done), unit="row", desc="infer", dynamic_ncols=True, file=sys.stderr,
               disable=not progress, smoothing=0.1)
    try:
        for batch, preds in batches:
            records = [{"i": i, "label": int(p.label), "thought": p.thought or "", "parse_ok": bool(p.parse_ok),
                        "how": p.how, "closed": json_object_closed(p.generation or ""), "cut": cut[i]}
                       for i, p in zip(batch, preds)]
            bar.update(len(partial.add(records)))
    finally:
        bar.close()
    missing = [i for i in range(n) if i not in partial.done]
    if missing:  # never silently: a backend that dropped rows is a bug
        raise RuntimeError(f"{len(missing)} rows got no prediction (first: row {missing[0]})")


# --- command line --------------------------------------------------------------------------------------------------
def checkpoint_command_parser(prog: str, description: str, input_help: str, output: str,
                              output_what: str) -> argparse.ArgumentParser:
    """Arguments of a command that runs a checkpoint over an input file into a resumable output file."""
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=description,
                                epilog="Any --key=value is a config override, e.g. --infer_batch_size=8.")
    p.add_argument("input", help=input_help)
    p.add_argument("--checkpoint", help="checkpoint or run directory (default: newest run under checkpoints/)")
    p.add_argument("--output", default=output, help=f"{output_what} (default: {output})")
    p.add_argument("--fresh", action="store_true", help="ignore a partial file from an interrupted run")
    return p


def _parser() -> argparse.ArgumentParser:
    p = checkpoint_command_parser(
        "python -m app infer", "Batched inference on a CSV/JSONL with premise and hypothesis columns.",
        "CSV or JSONL with premise and hypothesis (label and id optional)", DEFAULT_OUTPUT, "predictions CSV")
    p.add_argument("--examples", type=int, default=5, help="example rows to print at the end (default 5)")
    return p


def cli(argv: list[str]) -> int:
    args, rest = _parser().parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        hint = "config overrides take the form --name=value" if bad[0].startswith("--") else (
            "usage: python -m app infer INPUT [--checkpoint DIR] [--output FILE] [--key=value ...]")
        raise UserError(f"unexpected argument {bad[0]!r}; {hint}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run(args.input, args.checkpoint, args.output, rest, fresh=args.fresh, examples=args.examples,
            progress=True)
    except KeyboardInterrupt:
        print("interrupted: finished batches are saved; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0
