"""One command per experiment: `python -m app pipeline NAME [--scale tiny|full] [--dry-run]`.

Each module here is an experiment written as the list of commands a user would type (`app/pipelines/<name>.py`),
run by app/pipelines/steps.py: every step is a `python -m app ...` command with its inputs and outputs, skipped when
its output is up to date, and the last step writes the report. Nothing in the library imports these modules.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from app.errors import UserError

PIPELINES = {
    "nli_cot": "cot generate (server), reflect, combine, train, infer test, score dev",
    "confidence_tokens": "tag, train, calibration",
    "confidence_head": "steps convert, train, score-steps",
    "ranking": "ranking prepare, candidates, rewards, train, rank",
    "lookahead": "the seeds experiment",
}
SCALES = ("tiny", "full")


def build(name: str, scale: str, work: Path | None = None, data: Path | None = None):
    if name not in PIPELINES:
        raise UserError(f"pipeline {name!r}: unknown; known: {', '.join(PIPELINES)}")
    if scale not in SCALES:
        raise UserError(f"--scale={scale!r}: one of {', '.join(SCALES)}")
    work = work or Path("checkpoints") / "pipelines" / f"{name}_{scale}"
    return importlib.import_module(f"app.pipelines.{name}").build(scale, work, data)
