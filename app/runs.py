"""The shell every command that reads a checkpoint shares (`infer`, `score-steps`, ...).

  checkpoint choice   `resolve_checkpoint`: a checkpoint directory, a run directory, or the newest run under
                      checkpoints/ (within a run: final, else best, else the highest step)
  checkpoint config   `checkpoint_config`: the saved run_config.json with the user's overrides; settings that
                      widen trust come only from the user, and a checkpoint that needs remote code says which flag
  resumable output    `PartialFile`: finished batches appended and fsynced to a JSON-lines file headed by a
                      `fingerprint` of the input, the checkpoint's files, the config and any named parts
  device, tiny base   `device()`, `ensure_base_model()`
  the run itself      `run_predictor`: everything in order, with every check done before any work, so that bad
                      input or a broken checkpoint leaves no file behind

A task says what it predicts through a `Predictor` (app/tasks/protocol.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from app import sources
from app.config import saved_config
from app.data import intact_json_lines
from app.errors import UserError
from app.registry import get_task

CHECKPOINT_ROOT = Path("checkpoints")
PARTIAL_FORMAT = "app.infer.partial/1"
_STEP = re.compile(r"^step_(\d+)$")


# --- checkpoint choice ---------------------------------------------------------------------------------------------
def _is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / "run_config.json").is_file()


def _complete_checkpoints(run_checkpoints: Path) -> list[Path]:
    if not run_checkpoints.is_dir():
        return []
    return [p for p in run_checkpoints.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_complete(p)]


def _written_at(checkpoint: Path) -> float:
    return (checkpoint / "trainer_state.json").stat().st_mtime


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
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (give a checkpoint or run directory)")
    if (path / "run_config.json").is_file() and any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        return path, "given"
    for run_checkpoints in (path / "checkpoints", path):
        chosen = _preferred(_complete_checkpoints(run_checkpoints))
        if chosen is not None:
            return chosen, f"preferred checkpoint of {path} (final, then best, then the newest step)"
    raise UserError(f"{path}: not a checkpoint (no run_config.json with model or adapter files) and holds none")


def verify(checkpoint: Path) -> None:
    """The checkpoint's files against its manifest (sizes and sha256); a one-line UserError naming the bad file."""
    from app.checkpoint import verify_checkpoint  # torch: imported by the commands that load a model only

    verify_checkpoint(checkpoint)


# --- checkpoint config ---------------------------------------------------------------------------------------------
def _needs_remote_code(checkpoint: Path) -> bool:
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((checkpoint / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            return True
    return False


def checkpoint_config(checkpoint: Path, overrides=()):
    """The run config saved in the checkpoint, with `--key=value` overrides, validated (app.config.saved_config).

    `trust_remote_code` is never taken from the saved config: a checkpoint whose model or tokenizer maps to bundled
    code (`auto_map`) is an error unless the user passes --trust_remote_code=True."""
    cfg = saved_config(checkpoint / "run_config.json", overrides)
    if _needs_remote_code(checkpoint) and not cfg.trust_remote_code:
        raise UserError(f"{checkpoint}: its config.json maps to model code bundled with the checkpoint (auto_map); "
                        "it runs only with --trust_remote_code=True, if you trust where it came from")
    return cfg


# --- resumable output ----------------------------------------------------------------------------------------------
def fingerprint(input_path: Path, checkpoint: Path, cfg, parts: dict | None = None,
                ignore: tuple[str, ...] = ("infer_batch_size",)) -> str:
    """Identity of what the outputs depend on: input bytes, checkpoint files, the config (but `ignore`: a smaller
    batch after an out-of-memory error still resumes) and any named `parts` (JSON-able)."""
    h = hashlib.sha256()
    # Parquet, save_to_disk and hf: inputs are named by their fingerprint (Hub: id + revision)
    h.update(sources.describe(input_path).get("fingerprint", str(input_path)).encode() if sources.handles(input_path)
             else hashlib.sha256(input_path.read_bytes()).digest())
    h.update(str(checkpoint.resolve()).encode())
    for f in sorted(checkpoint.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    settings = {k: v for k, v in cfg.model_dump().items() if k not in ignore}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if parts:
        h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


class PartialFile:
    """Append-only JSON lines: a header with the fingerprint, then one line of records per finished batch.

    Records are dicts with an "i" (row index). Nothing is written until the first batch is added, so a run that
    fails before predicting anything leaves no partial file behind."""

    def __init__(self, path: Path, fp: str, n_rows: int, fresh: bool = False):
        self.path, self.fp, self.n_rows = path, fp, n_rows
        self.done: dict[int, dict] = {}
        self.handle = None
        self._resume_at = self._load() if not fresh and path.is_file() else None
        if self._resume_at is None:
            self.done = {}

    def _open(self) -> None:
        try:
            self._open_file()
        except OSError as err:
            raise UserError(f"{self.path}: cannot write ({err.strerror or err})") from None

    def _open_file(self) -> None:
        if self._resume_at is not None:
            self.handle = open(self.path, "r+", encoding="utf-8")
            self.handle.seek(self._resume_at)
            self.handle.truncate()  # a line torn by a kill is dropped, and redone
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w", encoding="utf-8")
        self._append({"format": PARTIAL_FORMAT, "fingerprint": self.fp, "rows": self.n_rows})

    def _load(self) -> int | None:
        """Byte offset after the last intact line; None when the file is not ours to continue."""
        values, end = intact_json_lines(self.path.read_bytes())
        if not values:
            return None
        header = values[0]
        if not (isinstance(header, dict) and header.get("format") == PARTIAL_FORMAT and header.get("fingerprint") == self.fp
                and header.get("rows") == self.n_rows):
            print(f"warning: {self.path} was written for another input, checkpoint or config: starting over",
                  file=sys.stderr)
            return None
        for obj in values[1:]:
            if isinstance(obj, dict):
                for rec in obj.get("records", []):
                    if isinstance(rec, dict) and isinstance(rec.get("i"), int) and 0 <= rec["i"] < self.n_rows:
                        self.done.setdefault(rec["i"], rec)
        return end

    def _append(self, obj) -> None:
        try:
            self.handle.write(json.dumps(obj, ensure_ascii=False) + "\n")
            self.handle.flush()
            os.fsync(self.handle.fileno())
        except OSError as err:  # a full disk: the batches already there stay, a re-run redoes a torn line
            raise UserError(f"{self.path}: cannot write ({err.strerror or err}); finished batches are kept") from None

    def add(self, records: list[dict]) -> list[dict]:
        new = [r for r in records if r["i"] not in self.done]
        if new:
            if self.handle is None:
                self._open()
            self._append({"records": new})
            for r in new:
                self.done[r["i"]] = r
        return new

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


# --- device, outputs, tiny base ------------------------------------------------------------------------------------
def device():
    import torch  # only where a model runs: the cot pipeline checks its output paths here without torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_output(path: Path, input_path: Path) -> None:
    """Fail before any work when `path` cannot be written: a directory, the input itself, an uncreatable folder."""
    if path.is_dir():
        raise UserError(f"--output {path}: is a directory; give a file path (e.g. {path / 'predictions.csv'})")
    if path.resolve() == input_path.resolve():
        raise UserError(f"--output {path} is the input file; choose another path")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--output {path}: cannot create its folder: {existing} is a file")
    if existing is not None and not os.access(existing, os.W_OK):
        raise UserError(f"--output {path}: {existing} is not writable")


def check_new_folder(folder: Path, label: str) -> None:
    """Fail before any work when `folder` cannot be created or written into: it, or a folder above it, is a file,
    or the nearest existing one is not writable. `label` names it as the user gave it (e.g. `--output out`)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing == folder and not folder.is_dir():
        raise UserError(f"{label}: is a file, not a directory")
    if existing is not None and not existing.is_dir():
        raise UserError(f"{label}: cannot create it, {existing} is a file")
    if existing is not None and not os.access(existing, os.W_OK):
        raise UserError(f"{label}: {existing} is not writable")


def refuse_side_file_on_input(side: Path, what: str, output: Path, input_path: Path) -> None:
    """Fail before any work when a side file of `output` (its stats, metrics or partial file) is the input."""
    if side.resolve() == input_path.resolve():
        raise UserError(f"{side}: is the input file, and the {what} file of output {output} would overwrite it; "
                        "choose another output path")


class JsonlOutputs:
    """Outputs of a predictor that writes JSON lines: OUT.jsonl, OUT.metrics.json and OUT.jsonl.partial.jsonl."""

    def __init__(self, output: Path, example: str, what: str):
        out = Path(output)
        if out.name.endswith(".metrics.json") or out.name.endswith(".partial.jsonl"):
            raise UserError(f"--output {out}: give the {what} JSONL path (e.g. {example})")
        stem = out.with_suffix("") if out.suffix else out
        self.main, self.metrics = out, stem.with_name(stem.name + ".metrics.json")
        self.partial = out.with_name(out.name + ".partial.jsonl")


def ensure_base_model(cfg, checkpoint: Path | None = None) -> None:
    """Write the embedded tiny model to cfg.model_name when the config asks for it and it is missing (an adapter
    over it needs its base rebuilt exactly as it was trained)."""
    if not cfg.create_tiny_model:
        return
    if checkpoint is not None and not (checkpoint / "adapter_config.json").is_file():
        return  # a full checkpoint holds its own weights
    if not (Path(cfg.model_name) / "config.json").is_file():
        from app.lm.tiny import ensure_tiny_model  # torch and transformers: only when a tiny base is built

        ensure_tiny_model(cfg.model_name)


# --- the run -------------------------------------------------------------------------------------------------------
def run_predictor(input_path, checkpoint: str | None, output, overrides=(), fresh: bool = False, examples: int = 5,
                  root: str | Path = CHECKPOINT_ROOT, progress: bool = True, task_name: str | None = None) -> dict:
    """Predict every row of `input_path` with a checkpoint's task predictor; write its outputs; return the summary.

    Order: checkpoint and its config, the predictor, the input, the output path; only then the model loads, so a
    bad input, a bad checkpoint or an unwritable output fails in one line with nothing written."""
    input_path = Path(input_path)
    ckpt, why = resolve_checkpoint(checkpoint, root)
    cfg = checkpoint_config(ckpt, list(overrides))
    if task_name is not None and cfg.task != task_name:
        raise UserError(f"{ckpt}: trained for task={cfg.task!r}; this command needs a {task_name} checkpoint")
    predictor = get_task(cfg.task).predictor(cfg)
    if predictor is None:
        raise UserError(f"task={cfg.task!r} has no predictor to run inference with")
    inputs = predictor.read_input(input_path, cfg)  # bad input fails before any model loads
    paths = predictor.output_paths(Path(output) if output else Path(predictor.default_output))
    check_output(paths.main, input_path)
    for what, side in vars(paths).items():
        if isinstance(side, Path) and side != paths.main:
            refuse_side_file_on_input(side, what, paths.main, input_path)
    verify(ckpt)
    print(f"checkpoint: {ckpt} ({why})", file=sys.stderr)

    n = len(inputs)
    partial = PartialFile(paths.partial, fingerprint(input_path, ckpt, cfg, predictor.fingerprint_parts(cfg)), n,
                          fresh=fresh)
    started, t0 = len(partial.done), time.perf_counter()
    if 0 < started < n:
        print(f"resuming: {started} of {n} rows already done in {paths.partial}", file=sys.stderr)
    try:
        if started < n:
            _predict_missing(predictor, ckpt, cfg, inputs, partial, progress)
    finally:
        partial.close()
    elapsed = time.perf_counter() - t0
    records = [partial.done[i] for i in range(n)]
    summary = {"input": str(input_path), "checkpoint": str(ckpt), "rows": n, "rows_predicted_now": n - started,
               "rows_per_s": round((n - started) / elapsed, 2) if elapsed > 0 and n > started else None}
    summary = predictor.finish(inputs, records, paths, summary, examples)
    paths.partial.unlink(missing_ok=True)
    return summary


def _predict_missing(predictor, ckpt: Path, cfg, inputs, partial: PartialFile, progress: bool) -> None:
    ensure_base_model(cfg, ckpt)
    state = predictor.load(ckpt, cfg, device())
    n = len(inputs)
    bar = tqdm(total=n, initial=len(partial.done), unit="row", desc=predictor.verb, dynamic_ncols=True,
               file=sys.stderr, disable=not progress, smoothing=0.1)
    try:
        batches = predictor.predict(state, cfg, inputs, device(), skip=lambda b: all(i in partial.done for i in b))
        for records in batches:
            bar.update(len(partial.add(records)))
    finally:
        bar.close()
    missing = [i for i in range(n) if i not in partial.done]
    if missing:  # never silently: a predictor that dropped rows is a bug
        raise RuntimeError(f"{len(missing)} rows got no prediction (first: row {missing[0]})")


def run_command(*args, **kwargs) -> int:
    """run_predictor for a command line: Ctrl-C keeps the finished batches and says how to continue."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run_predictor(*args, **kwargs)
    except KeyboardInterrupt:
        print("interrupted: finished batches are saved; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0
