"""The pipeline runner: a list of steps, each a `python -m app ...` command (or a short function) with its inputs and
outputs, run in order, each skipped when its output is up to date.

A step that finished before and must run again because its inputs changed gets its `redo_args` (a training run:
`--resume=fresh`, so that a finished run trains again on the new data, its old checkpoints moved aside).

Up to date: the step's stamp (`WORK/.pipeline/NN-name.json`, written when the step succeeded) holds the same key
(its command and the size and modification time of every input) and every output still has the size and
modification time recorded then. Anything else runs the step again: a changed input, a changed setting, an output
deleted or rewritten. A killed pipeline re-run skips the finished steps and runs the unfinished one again, which
continues where it stopped (the commands resume: training from its checkpoint, `infer` from its partial file,
`cot` from its reply cache, the ranking data steps by their stats).

Steps that talk to a model server (`server=True`) get `{server}` in their arguments replaced by its base URL; the
pipeline starts the server before the first such step that must run and stops it at the end (or on an error).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.atomic import write_json_atomic
from app.errors import UserError

STAMPS = ".pipeline"


@dataclass
class Step:
    name: str
    args: list[str] | None  # python -m app ARGS; None: `run` does the work
    inputs: list[Path]
    outputs: list[Path]
    expect_s: float  # expected wall time at this scale (for --dry-run)
    run: Callable[[], None] | None = None
    describe: str = ""  # what `run` does, for --dry-run
    server: bool = False
    env: dict[str, str] = field(default_factory=dict)
    redo_args: list[str] = field(default_factory=list)  # added when a step that succeeded before must run again

    def command(self, server_url: str = "{server}") -> list[str]:
        return ["python", "-m", "app", *(a.replace("{server}", server_url) for a in self.args)] if self.args else []

    def shown(self) -> str:
        return shlex.join(self.command()) if self.args else f"({self.describe})"


@dataclass
class Pipeline:
    name: str
    scale: str
    work: Path
    steps: list[Step]
    server: Callable[[], object] | None = None  # a context manager yielding the base URL
    notes: str = ""


def signature(path: Path) -> list | None:
    """[size, mtime_ns] of a file; of a folder, the files under it by relative path; None when missing."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return sorted([str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
                      for p in path.rglob("*") if p.is_file())
    return None


def step_key(step: Step) -> str:
    h = hashlib.sha256(json.dumps(step.args if step.args else ["fn", step.name, step.describe]).encode())
    if step.run is not None:  # a function step is also its code: the module that defines it
        h.update(inspect.getsource(sys.modules[step.run.__module__]).encode())
    h.update(json.dumps(step.env, sort_keys=True).encode())
    for path in step.inputs:
        h.update(json.dumps([str(path), signature(path)]).encode())
    return h.hexdigest()


def stamp_path(pipeline: Pipeline, index: int, step: Step) -> Path:
    return pipeline.work / STAMPS / f"{index:02d}-{step.name}.json"


def up_to_date(pipeline: Pipeline, index: int, step: Step) -> bool:
    path = stamp_path(pipeline, index, step)
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(stamp, dict) and stamp.get("key") == step_key(step)
            and all(stamp.get("outputs", {}).get(str(p)) == signature(p) for p in step.outputs))


def write_stamp(pipeline: Pipeline, index: int, step: Step, seconds: float) -> None:
    missing = [str(p) for p in step.outputs if signature(p) is None]
    if missing:
        raise UserError(f"step {step.name}: finished without writing {', '.join(missing)}")
    write_json_atomic(stamp_path(pipeline, index, step),
                      {"key": step_key(step), "outputs": {str(p): signature(p) for p in step.outputs},
                       "seconds": round(seconds, 2), "command": step.shown()})


def fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def dry_run(pipeline: Pipeline, echo=print) -> None:
    """Every step with its state, expected time and command; inputs no earlier step writes and that are missing."""
    produced: set[str] = set()
    echo(f"pipeline {pipeline.name} ({pipeline.scale}) in {pipeline.work}")
    if pipeline.notes:
        echo(pipeline.notes)
    pending = False
    for i, step in enumerate(pipeline.steps, 1):
        fresh = not pending and up_to_date(pipeline, i, step)
        pending |= not fresh
        echo(f"{i:2d}. {step.name:<14} {'up to date' if fresh else 'to run':<10} ~{fmt_s(step.expect_s):>7}  "
             f"{step.shown()}")
        for path in step.inputs:
            if str(path) not in produced and not path.exists():
                echo(f"    missing input: {path}")
        produced |= {str(p) for p in step.outputs}
    total = sum(s.expect_s for i, s in enumerate(pipeline.steps, 1) if not up_to_date(pipeline, i, s))
    echo(f"expected time of the steps to run: ~{fmt_s(total)}")


def run_pipeline(pipeline: Pipeline, echo=print) -> dict:
    """Run the steps that are not up to date, in order; return {step: "up to date" | seconds}."""
    pipeline.work.mkdir(parents=True, exist_ok=True)
    done: dict[str, object] = {}
    server_ctx, server_url = None, None
    start = time.perf_counter()
    try:
        for i, step in enumerate(pipeline.steps, 1):
            if up_to_date(pipeline, i, step):
                echo(f"[{i}/{len(pipeline.steps)}] {step.name}: up to date")
                done[step.name] = "up to date"
                continue
            if step.server and server_url is None:
                server_ctx = pipeline.server()
                server_url = server_ctx.__enter__()
            shown = shlex.join(step.command(server_url or "")) if step.args else step.describe
            echo(f"[{i}/{len(pipeline.steps)}] {step.name}: {shown}")
            t0 = time.perf_counter()
            if step.args:
                redo = step.redo_args if stamp_path(pipeline, i, step).is_file() else []
                stamp_path(pipeline, i, step).unlink(missing_ok=True)  # a kill from here resumes, not redoes
                if redo:
                    echo(f"    its inputs changed since it last finished: {' '.join(redo)}")
                run_command(step, server_url, redo)
            else:
                step.run()
            seconds = time.perf_counter() - t0
            write_stamp(pipeline, i, step, seconds)
            done[step.name] = round(seconds, 1)
            remaining_server = any(s.server for s in pipeline.steps[i:])
            if server_ctx is not None and not remaining_server:
                server_ctx.__exit__(None, None, None)
                server_ctx = None
    finally:
        if server_ctx is not None:
            server_ctx.__exit__(None, None, None)
    echo(f"pipeline {pipeline.name} ({pipeline.scale}): done in {time.perf_counter() - start:.1f} s")
    return done


def run_command(step: Step, server_url: str | None, extra: list[str] = ()) -> None:
    argv = [sys.executable, "-m", "app", *(a.replace("{server}", server_url or "") for a in step.args), *extra]
    proc = subprocess.run(argv, env={**os.environ, **step.env})
    if proc.returncode in (130, 143):  # stopped by Ctrl-C / SIGTERM: it saved its progress
        raise KeyboardInterrupt
    if proc.returncode:
        shown = shlex.join(step.command(server_url or ""))
        raise UserError(f"step {step.name} failed (exit {proc.returncode}): {shown}; fix the cause and re-run the "
                        "pipeline to continue from this step")
