"""Task registry: config `task = "name"` -> the task's package under app/tasks/.

A task is a package with
  config.py    its config section (a pydantic `Section`), METRICS (name -> "max"/"min") and DEFAULT_METRIC;
               torch-free, so `python -m app config` stays light
  task.py      a `Task` subclass (protocol: app/tasks/protocol.py)
  commands.py  optional: click commands of its own (`tag`, `score-steps`, ...), named in its registry entry
Adding one is a package plus one entry in TASKS below; nothing else changes.

This module sits under the config, the engine and the commands: it names packages as strings and imports them only
when asked, so it imports no task (and no torch) itself.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from app.errors import UserError


@dataclass(frozen=True)
class TaskEntry:
    package: str  # app.tasks.<name>
    schema: str  # class name in <package>.config
    task: str  # class name in <package>.task
    sample: str  # "module:function" writing the bundled sample data to a directory
    commands: tuple[str, ...] = ()  # click commands in <package>.commands, by command name


TASKS = {
    "nli_cot": TaskEntry("app.tasks.nli_cot", "NliCotConfig", "NliCot", "sample:write_sample", commands=("cot",)),
    "confidence_tokens": TaskEntry("app.tasks.confidence_tokens", "ConfidenceTokensConfig", "ConfidenceTokens",
                                   "sample:write_sample", commands=("tag",)),
    "confidence_head": TaskEntry("app.tasks.confidence_head", "ConfidenceHeadConfig", "ConfidenceHead",
                                 "step_data:write_synthetic", commands=("score-steps", "steps")),
    "lookahead": TaskEntry("app.tasks.lookahead", "LookaheadConfig", "Lookahead", "corpus:write_sample",
                           commands=("experiment", "plot")),
    "ranking": TaskEntry("app.tasks.ranking", "RankingConfig", "Ranking", "sample:write_sample", commands=("ranking",)),
}


def check_task_name(name: str) -> None:
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"task={name!r}: unknown task{hint}; known: {', '.join(TASKS)}")


@cache
def task_config_module(name: str):
    """The task's config module: its section class, METRICS and DEFAULT_METRIC (no torch)."""
    check_task_name(name)
    return importlib.import_module(f"{TASKS[name].package}.config")


def task_schema(name: str):
    return getattr(task_config_module(name), TASKS[name].schema)


def task_metrics(name: str) -> dict[str, str]:
    return dict(task_config_module(name).METRICS)


def default_metric(name: str) -> str:
    return task_config_module(name).DEFAULT_METRIC


def get_task(name: str):
    """A fresh instance of the task's `Task` class (imports torch and the task's model code)."""
    check_task_name(name)
    entry = TASKS[name]
    return getattr(importlib.import_module(f"{entry.package}.task"), entry.task)()


def write_sample(name: str, directory) -> list:
    """Write the task's bundled sample data set to `directory`; the files written."""
    check_task_name(name)
    module, function = TASKS[name].sample.split(":")
    before = {p: p.stat().st_mtime_ns for p in Path(directory).rglob("*")} if Path(directory).is_dir() else {}
    getattr(importlib.import_module(f"{TASKS[name].package}.{module}"), function)(Path(directory))
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns)


def task_command_paths() -> dict[str, str]:
    """Command name -> "module:attribute" of the click commands tasks register (imported when run or listed)."""
    out = {}
    for entry in TASKS.values():
        for name in entry.commands:
            out[name] = f"{entry.package}.commands:{name.replace('-', '_')}"
    return out


__all__ = ["TASKS", "TaskEntry", "check_task_name", "default_metric", "get_task", "task_command_paths",
           "task_config_module", "task_metrics", "task_schema", "write_sample"]
