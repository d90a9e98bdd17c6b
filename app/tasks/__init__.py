"""Task registry: config `task = "name"` -> Task instance. A new task is a module plus one line here."""

from __future__ import annotations

import difflib
import importlib

from app.errors import UserError
from app.tasks.protocol import Feature, Task

# name -> "module:Class", imported on demand so one task's optional dependencies never load for another
TASKS = {
    "nli_cot": "app.tasks.nli_cot.task:NliCot",
    "confidence_tokens": "app.tasks.confidence_tokens.task:ConfidenceTokens",
    "confidence_head": "app.tasks.confidence_head.task:ConfidenceHead",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"task={name!r}: unknown task{hint}; known: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Feature", "Task", "TASKS", "get_task"]
