"""Experiment configs: Python modules of plain assignments, validated by the core schema plus the task's section.

    cfg = load_config("configs/tiny.py", ["--lora_r=64"])

One flat namespace, several schemas: the core sections (app/config/core.py: data, model, method, optimisation,
evaluation, run, inference) and the chosen task's section (app/tasks/<task>/config.py) are validated together, so
`--lora_r=64` and `--calib_beta=50` both work in files and on the command line. Every problem is reported at once,
one per line: an unknown name with the closest valid one (or the task whose setting it is), a wrong type with the
key, value and what was expected, a best-checkpoint metric the task does not declare.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path

from pydantic import ValidationError

from app.config.core import SECTIONS, TRUST_FIELDS, CoreConfig, ScratchModelSection, Section
from app.config.modules import Values, add_overrides, parse_override, read_config_file
from app.errors import UserError
from app.registry import TASKS, check_task_name, default_metric, task_metrics, task_schema

Config = CoreConfig  # every run's config is an instance of a subclass of it


@cache
def config_class(task: str) -> type[CoreConfig]:
    """The config class of a task: the core sections plus the task's own section, one flat model."""
    schema = task_schema(task)
    return type(f"{schema.__name__}Run", (CoreConfig, schema), {"__doc__": f"Config of a {task} run."})


def make_config(**values) -> CoreConfig:
    """A validated config from keyword values (defaults for the rest); the task is `task` (default nli_cot)."""
    return validate({k: (v, "arguments") for k, v in values.items()})


def _other_task_owning(name: str, task: str) -> str | None:
    return next((t for t in TASKS if t != task and name in task_schema(t).model_fields), None)


def _unknown(name: str, where: str, fields, task: str) -> str:
    owner = _other_task_owning(name, task)
    if owner is not None:
        return f"{where}: {name!r} is a setting of task {owner!r}, not of task {task!r}"
    return unknown_key(name, where, fields)


def _describe_type(cls, name: str) -> str:
    ann = cls.model_fields[name].annotation
    return str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _metric_problem(task: str, metric, where: str) -> str | None:
    metrics = task_metrics(task)
    if metric is None or not isinstance(metric, str) or metric in metrics:
        return None  # a non-string is reported as a type error
    return f"{where}: metric_for_best={metric!r} is not a metric of task {task!r} (one of: {', '.join(metrics)})"


def build_schema(cls, known: dict, values: Values, problems: list[str], coerce=None):
    """`cls(**known)`, or None with one line per validation error (key, value, where it was set, what was expected)
    appended to `problems`. Ints are fine for float fields (lr=1 is 1.0: strict mode would reject them);
    `coerce(name, value)` may adapt other values first."""
    known = dict(known)
    for k, v in known.items():
        if coerce is not None:
            known[k] = v = coerce(k, v)
        if cls.model_fields[k].annotation in (float, float | None) and type(v) is int:
            known[k] = float(v)
    try:
        return cls(**known)
    except ValidationError as err:
        for e in err.errors():
            key = str(e["loc"][0]) if e["loc"] else "?"
            where = values[key][1] if key in values else "config"
            value = repr(e.get("input"))
            value = value if len(value) <= 80 else value[:77] + "..."
            problems.append(f"{where}: {key}={value}: {e['msg'].lower()} (expected {_describe_type(cls, key)})")
    return None


def unknown_key(name: str, where: str, fields) -> str:
    """The one-line problem of a name no schema knows, with the closest valid one."""
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
    return f"{where}: unknown config key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def join_problems(problems: list[str]) -> str:
    return "invalid config:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0]


def derived_fields(cls) -> dict[str, str]:
    """The core fields a task's section sets itself (name -> why): none, or those of a model trained from scratch."""
    return dict(cls.DERIVED) if issubclass(cls, ScratchModelSection) else {}


def _derived_problems(task: str, cls, values: Values) -> list[str]:
    """A derived field set by the config, or no base model for a task that fine-tunes one."""
    derived = derived_fields(cls)
    problems = [f"{values[name][1]}: {name}: task {task!r} sets it ({why}); remove the setting"
                for name, why in derived.items() if name in values]
    if "model_name" not in derived and "model_name" in values and values["model_name"][0] is None:
        problems.append(f"{values['model_name'][1]}: model_name=None: task {task!r} fine-tunes a base model (a hub "
                        "name or a local directory)")
    return problems


def validate(values: Values, problems: list[str] | None = None) -> CoreConfig:
    """Validate merged values (name -> (value, where)) against the core schema and the task's section."""
    problems = list(problems or [])
    task = values.get("task", (CoreConfig.model_fields["task"].default, ""))[0]
    try:
        check_task_name(task)
    except UserError as err:
        problems.append(f"{values['task'][1]}: {err}")
        raise UserError(join_problems(problems)) from None
    cls = config_class(task)
    for name, (_, where) in values.items():
        if name not in cls.model_fields:
            problems.append(_unknown(name, where, cls.model_fields, task))
    problems += _derived_problems(task, cls, values)
    known = {k: v for k, (v, _) in values.items() if k in cls.model_fields}
    cfg = build_schema(cls, known, values, problems)
    problem = _metric_problem(task, *values.get("metric_for_best", (None, "config")))
    if problem:
        problems.append(problem)
    if problems:
        raise UserError(join_problems(problems))
    return cfg


def load_config(path: str | Path | None, overrides=()) -> CoreConfig:
    """Merge a config file (and its bases) with `--name=value` overrides, validate, report every problem at once."""
    values = read_config_file(Path(path)) if path is not None else {}
    problems: list[str] = []
    values = add_overrides(values, overrides, problems)
    return validate(values, problems)


def saved_config(path: Path, overrides=()) -> CoreConfig:
    """The config a checkpoint was trained with (its run_config.json), with the user's overrides on top.

    Settings that widen trust (TRUST_FIELDS) are never taken from the file: only an override sets them.
    Files from older versions of this program still load: settings of other tasks (all fields used to live in one
    schema) are dropped, `head_metric_for_best` becomes `metric_for_best`, a best-checkpoint metric the task
    does not declare falls back to the task's default, and the fields a task now sets itself (a from-scratch model's
    model_name="from-scratch", its corpus as train_file) are set again.
    """
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"{path}: cannot read the run config ({err})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: expected a JSON object")
    task = saved.get("task", CoreConfig.model_fields["task"].default)
    if task in TASKS:
        fields, derived = config_class(task).model_fields, derived_fields(config_class(task))
        if "head_metric_for_best" in saved and task == "confidence_head":
            saved["metric_for_best"] = saved["head_metric_for_best"]
        saved = {k: v for k, v in saved.items() if k in fields and k not in TRUST_FIELDS and k not in derived}
        if saved.get("metric_for_best") not in task_metrics(task):
            saved.pop("metric_for_best", None)
    problems: list[str] = []
    values = add_overrides({k: (v, str(path)) for k, v in saved.items()}, overrides, problems)
    return validate(values, problems)


def task_sections(name: str) -> list[type[Section]]:
    """The sections a task's schema is made of, those it builds on first (a from-scratch model's section) and its
    own last."""
    return [c for c in reversed(task_schema(name).__mro__)
            if issubclass(c, Section) and c is not Section and c not in SECTIONS and vars(c).get("__annotations__")]


def describe_fields(task: str | None = None) -> str:
    """Every field by section: name, default, meaning (`python -m app config --list [--task NAME]`)."""
    sections: list[tuple[str, type[Section]]] = [(s.__doc__ or s.__name__, s) for s in SECTIONS]
    for name in [task] if task else list(TASKS):
        for section in task_sections(name):
            if all(section is not listed for _, listed in sections):
                sections.append(((section.__doc__ or name).strip().splitlines()[0], section))
    out = []
    for title, section in sections:
        out.append(f"[{title}]")
        for name in (n for n in vars(section).get("__annotations__", {}) if n in section.model_fields):
            field = section.model_fields[name]
            out.append(f"  {name:<26} {field.default!r:<30.30} {field.description}")
        out.append("")
    for name in [task] if task else list(TASKS):
        metrics = ", ".join(f"{m} ({d})" for m, d in task_metrics(name).items())
        out.append(f"metric_for_best of task {name}: {metrics}; default {default_metric(name)}")
    return "\n".join(out)


__all__ = ["Config", "CoreConfig", "config_class", "describe_fields", "load_config", "make_config",
           "parse_override", "saved_config", "validate"]
