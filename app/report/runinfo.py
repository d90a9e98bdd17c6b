"""What a training run records for its report, beside metrics.jsonl: `run_info.json` and `warnings.log`.

The train command (app/train.py, at the engine's hook points) calls, on rank 0 only:

    record = RunRecord.start(cfg, world, sharded)   # once the model loaded, before the data is tokenized
    record.data(features, dev_features, plan, n_train_rows, n_dev_rows)
    record.finish(step, total_steps, signum)        # at the end of the invocation (also after a stop)
    close_run_record()                              # always (a run that raised leaves no handler behind)

`run_info.json` (written atomically at each call) holds:
  environment   host, platform, CPU model and count, GPUs, processes and sharding, python / torch / transformers /
                peft / accelerate versions, the commit of the checkout and whether it had changes, the command line
  config_origin the config file, its base_config, the command-line overrides, and the fields this config or the
                command line changed from its base (each with the base's value)
  data          per split: rows read, examples kept, tokens, examples over max_seq_length (from the warning the
                encoding logs), the tokenization cache (hit / written / off / not cached); the padding share of the
                first epoch's micro batches (right padding to the longest example of each)
  invocations   one entry per invocation (a resume adds one): start and end time, steps done from/to, status
                (running / finished / stopped / paused), exit signal, pid, peak host memory (the process's peak
                RSS) and peak GPU memory (torch's max allocated, per process)

`warnings.log` gets every WARNING-or-worse log record of the run, one line each, appended as they happen, so a run
killed mid-way keeps the warnings it logged.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from app.atomic import write_json_atomic

RUN_INFO = "run_info.json"
WARNINGS_LOG = "warnings.log"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "finetune-runner")
_CACHE_LOGGER = "app.engine.token_cache"
_CACHE_HIT = re.compile(r"^(?P<path>.*): \d+ tokenized examples from the cache ")
_CACHE_WRITTEN = re.compile(r"^(?P<path>.*): tokenized data cached in ")
_CACHE_SKIPPED = re.compile(r"^(?P<path>.*): features hold values JSON does not keep; not cached")
_OVER_LENGTH = re.compile(r"^(?P<path>.*): (?P<k>\d+) of (?P<n>\d+) examples longer than max_seq_length")
_current: RunRecord | None = None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(root: Path) -> dict | None:
    """The commit of the checkout this package runs from, and whether tracked files differ from it (None outside a
    git checkout or without git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if not status.returncode else None}


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def environment(world: int, sharded: bool) -> dict:
    return {"host": socket.gethostname(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "gpus": gpus(), "processes": world, "sharded": sharded,
            "versions": package_versions(), "git": git_commit(Path(__file__).resolve().parents[2]),
            "command": command_line(sys.argv)}


def command_line(argv: list[str]) -> list[str]:
    """The command as typed: `python -m app ...` for the package's entry point."""
    if not argv:
        return []
    first = argv[0]
    if Path(first).name == "__main__.py" and Path(first).parent.name == "app":
        return ["python", "-m", "app", *argv[1:]]
    return [Path(first).name, *argv[1:]]


def relative(where: str) -> str:
    """A 'file:line' place relative to the working directory when it lies under it."""
    path, _, line = where.rpartition(":")
    try:
        return f"{Path(path).resolve().relative_to(Path.cwd().resolve())}:{line}"
    except ValueError:
        return where


# --- where the config's values came from ----------------------------------------------------------------------------
def command_config_file(argv: list[str]) -> tuple[Path, list[str]] | None:
    """(config file, overrides) of a `train` / `experiment` command line; None for anything else (a test, a
    notebook)."""
    for i, arg in enumerate(argv[:-1]):
        if arg in ("train", "experiment") and argv[i + 1].endswith(".py") and Path(argv[i + 1]).is_file():
            return Path(argv[i + 1]), [a for a in argv[i + 2 :] if a.startswith("--") and "=" in a]
    return None


def config_origin(cfg, argv: list[str]) -> dict | None:
    """The config file, its base and the fields this file or the command line changed from the base (a field the
    base does not set compares with the schema default). None when the run did not come from a config file or the
    file no longer reads."""
    found = command_config_file(argv)
    if found is None:
        return None
    path, overrides = found
    from app.config.modules import parse_override, read_config_file

    try:
        own = read_config_file(path)
        base_name = next((str(v) for k, (v, _) in _raw_assignments(path).items() if k == "base_config"), None)
        base = read_config_file(path.resolve().parent / base_name) if base_name else {}
        overridden = dict(parse_override(a) for a in overrides)
    except Exception:  # noqa: BLE001 - the origin is a nicety: the config was validated when the run started
        return None
    defaults = {name: field.default for name, field in type(cfg).model_fields.items()}
    resolved = cfg.model_dump()
    own_file = str(path.resolve())
    changed = {}
    for name, value in resolved.items():
        set_here = name in overridden or (name in own and own[name][1].rsplit(":", 1)[0] == own_file)
        before = base[name][0] if name in base else defaults.get(name)
        if set_here and value != before:
            changed[name] = {"base": before, "set_at": "command line" if name in overridden else relative(own[name][1])}
    return {"config_file": str(path), "base_config": base_name, "overrides": overrides,
            "changed": json.loads(json.dumps(changed, default=str))}


def _raw_assignments(path: Path) -> dict:
    """base_config as the file itself assigns it (read_config_file folds the base in)."""
    import ast

    out = {}
    for node in ast.parse(path.read_text(encoding="utf-8-sig")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = (node.value.value, node.lineno)
    return out


# --- data ----------------------------------------------------------------------------------------------------------
def padding_share(lengths, micro_batches) -> float | None:
    """Share of padding in right-padded micro batches: 1 - real tokens / (batch size x longest example)."""
    real = padded = 0
    for batch in micro_batches:
        sizes = [lengths[i] for i in batch]
        real += sum(sizes)
        padded += max(sizes) * len(sizes)
    return 1 - real / padded if padded else None


def first_epoch_padding(plan) -> float | None:
    lengths = [min(n, plan.window) if plan.window else n for n in plan.lengths]
    if plan.steps_per_epoch == 0:
        return None
    return padding_share(lengths, [slot for step in plan.epoch_order(0) for slot in step])


class _Recorder(logging.Handler):
    """Appends warnings to warnings.log and notes what the token cache and the encoding said about each file."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.path = path
        self.cache: dict[str, str] = {}
        self.over_length: dict[str, tuple[int, int]] = {}

    def emit(self, record):
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call is the logger's problem, not the run's
            return
        if record.name == _CACHE_LOGGER:
            for pattern, outcome in ((_CACHE_HIT, "hit"), (_CACHE_WRITTEN, "written"), (_CACHE_SKIPPED, "not cached")):
                m = pattern.match(message)
                if m:
                    self.cache[m["path"]] = outcome
        if record.levelno < logging.WARNING:
            return
        m = _OVER_LENGTH.match(message)
        if m:
            self.over_length[m["path"]] = (int(m["k"]), int(m["n"]))
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{stamp} {record.levelname} {record.name}: {' '.join(message.splitlines())}\n")
        except OSError:
            pass  # a full disk must not stop the run over its warning log


class RunRecord:
    """run_info.json of one run directory, updated by this invocation (see the module docstring)."""

    def __init__(self, cfg, info: dict, recorder: _Recorder, cache_level: int):
        self.cfg, self.info, self.recorder, self.cache_level = cfg, info, recorder, cache_level
        self.path = cfg.out_path / RUN_INFO

    @classmethod
    def start(cls, cfg, world: int, sharded: bool) -> RunRecord:
        global _current
        close_run_record()
        path = cfg.out_path / RUN_INFO
        try:
            old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            old = {}
        invocations = old.get("invocations", []) if isinstance(old, dict) and cfg.resume != "fresh" else []
        for inv in invocations:  # an earlier invocation still "running" was killed (SIGKILL, a node lost)
            if inv.get("status") == "running":
                inv["status"] = "killed"
        info = {"format": 1, "environment": environment(world, sharded),
                "config_origin": config_origin(cfg, sys.argv), "data": None,
                "invocations": [*invocations, {"started": now(), "started_unix": time.time(), "pid": os.getpid(),
                                               "status": "running"}]}
        recorder = _Recorder(cfg.out_path / WARNINGS_LOG)
        cache_logger = logging.getLogger(_CACHE_LOGGER)
        level = cache_logger.level
        if cache_logger.getEffectiveLevel() > logging.INFO:  # its hit/written lines are INFO
            cache_logger.setLevel(logging.INFO)
        logging.getLogger().addHandler(recorder)
        _current = cls(cfg, info, recorder, level)
        _current.write()
        return _current

    def write(self) -> None:
        try:
            write_json_atomic(self.path, json.loads(json.dumps(self.info, default=str)))
        except Exception as err:  # noqa: BLE001 - the record is for the report: never fail the run over it
            logging.getLogger(__name__).warning("run_info.json not written: %s", err)

    def data(self, features, dev_features, plan, n_train_rows: int, n_dev_rows: int) -> None:
        cfg = self.cfg

        def split(path, rows, feats):
            over = self.recorder.over_length.get(str(path))
            cache = self.recorder.cache.get(str(path), "off" if not cfg.token_cache else "not cached")
            return {"file": None if path is None else str(path), "rows": rows, "examples": len(feats),
                    "tokens": int(sum(len(f.input_ids) for f in feats)), "over_length": over[0] if over else 0,
                    "overlength": cfg.overlength, "token_cache": cache if feats else None}

        self.info["data"] = {"train": split(cfg.train_file, n_train_rows, features),
                             "dev": split(cfg.dev_file, n_dev_rows, dev_features),
                             "max_seq_length": cfg.max_seq_length, "padding_share": first_epoch_padding(plan),
                             "steps_per_epoch": plan.steps_per_epoch}
        self.write()

    def finish(self, step: int, total_steps: int, signum: int | None) -> None:
        import resource

        import torch

        inv = self.info["invocations"][-1]
        ended = time.time()
        status = "finished" if step >= total_steps else "stopped" if signum is not None else "paused"
        inv.update({"ended": now(), "wall_s": round(ended - inv["started_unix"], 3), "status": status,
                    "signal": signum, "step": step, "total_steps": total_steps,
                    "peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                    "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                    if torch.cuda.is_available() else None})
        self.write()

    def close(self) -> None:
        logging.getLogger().removeHandler(self.recorder)
        logging.getLogger(_CACHE_LOGGER).setLevel(self.cache_level)


def close_run_record() -> None:
    """Detach the current run's recorder (called when train() returns or raises)."""
    global _current
    if _current is not None:
        _current.close()
        _current = None
