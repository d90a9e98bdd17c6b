"""Read a run directory into what its report shows: only files the run wrote, never an error for a run that is still
going or was killed.

  run_config.json   the resolved config (its task names the metrics and their direction)
  metrics.jsonl     every logged value per step (app.metrics.plots.read_metrics: a torn last line is skipped)
  run_info.json     environment, config origin, data, invocations (app/report/runinfo.py); absent in older runs
  warnings.log      the warnings the run logged
  checkpoints/      count and size; `final/` means the run finished
  reliability JSON  calibration of the confidence tasks (reliability_*.json, eval/step_*_reliability.json)
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError
from app.report.runinfo import RUN_INFO, WARNINGS_LOG

BASELINE_PREFIXES = ("random_", "majority_", "oracle_")
_LOWER_IS_BETTER = ("loss", "error", "ece", "mce", "brier", "perplexity", "failures", "nll")


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    info: dict | None
    records: list[dict]
    status: str = "unknown"
    status_note: str = ""
    checkpoints: list[tuple[str, int]] = field(default_factory=list)  # (name, bytes)
    warnings: list[str] = field(default_factory=list)
    calibration: list[tuple[Path, dict]] = field(default_factory=list)  # (file, reliability data)

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.records), default=0)


# --- finding runs -----------------------------------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    return (path / "run_config.json").is_file() or (path / "metrics.jsonl").is_file()


def find_runs(paths: list[str]) -> list[Path]:
    """The run directories named, a directory holding runs (an experiment's out_dir) standing for its runs."""
    found: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise UserError(f"{path}: run directory not found")
        if not path.is_dir():
            raise UserError(f"{path}: not a directory (give a run's out_dir)")
        if is_run_dir(path):
            found.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
        if not inner:
            raise UserError(f"{path}: not a run directory (no run_config.json or metrics.jsonl) and holds none")
        found.extend(inner)
    return found


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_run(path: Path) -> Run:
    from app.metrics.plots import read_metrics

    config = _read_json(path / "run_config.json")
    info = _read_json(path / RUN_INFO)
    records = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    run = Run(path, path.resolve().name, config if isinstance(config, dict) else {},
              info if isinstance(info, dict) else None, records)
    run.checkpoints = checkpoint_sizes(path / "checkpoints")
    run.status, run.status_note = run_status(run)
    run.warnings = read_warnings(path / WARNINGS_LOG)
    run.calibration = reliability_files(path)
    return run


# --- status -----------------------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def run_status(run: Run) -> tuple[str, str]:
    """(finished | running | stopped | paused | killed | unfinished, a note saying why)."""
    names = {n for n, _ in run.checkpoints}
    invocations = (run.info or {}).get("invocations") or []
    last = invocations[-1] if invocations else None
    if "final" in names and (last is None or last.get("status") != "running"):
        return "finished", f"final checkpoint at step {run.last_step}"
    if last is not None:
        status = last.get("status")
        if status == "running":
            host = (run.info.get("environment") or {}).get("host")
            pid = last.get("pid")
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                return "killed", f"process {pid} is gone without finishing (killed or crashed) at step {run.last_step}"
            if host == socket.gethostname():
                return "running", f"process {pid} on this host, at step {run.last_step}"
            return "running", f"started on {host}; still running there, or killed (last step logged {run.last_step})"
        if status == "stopped":
            return "stopped", f"stopped by signal {last.get('signal')} at step {last.get('step')}; re-run to resume"
        if status == "paused":
            return "paused", f"stop_after_steps reached at step {last.get('step')} of {last.get('total_steps')}"
        if status == "finished":
            return "finished", f"step {last.get('step')}"
    metrics = run.path / "metrics.jsonl"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(metrics.stat().st_mtime)) if metrics.is_file() else "?"
    return "unfinished", f"no final checkpoint; last step logged {run.last_step} (at {when}): running or killed"


# --- files ------------------------------------------------------------------------------------------------------------
def checkpoint_sizes(root: Path) -> list[tuple[str, int]]:
    if not root.is_dir():
        return []
    out = []
    for ckpt in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out.append((ckpt.name, sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())))
    return out


def read_warnings(path: Path) -> list[str]:
    """The warning lines, repeated messages (same text after the time stamp) shown once with their count."""
    if not path.is_file():
        return []
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        message = line[20:] if len(line) > 20 and line[4] == "-" else line
        counts[message] = counts.get(message, 0) + 1
        first.setdefault(message, line)
    return [first[m] + (f" (x{n})" if n > 1 else "") for m, n in counts.items()]


def _find_reliability(data) -> dict | None:
    """The pooled reliability data in a calibration JSON (a dict with a 'bins' list, found breadth first)."""
    queue = [data]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if isinstance(node.get("bins"), list) and node["bins"]:
                return node
            queue.extend(node[k] for k in sorted(node, key=lambda k: k != "all"))
    return None


def _step_of_file(path: Path) -> int:
    digits = "".join(c if c.isdigit() else " " for c in path.stem).split()
    return int(digits[-1]) if digits else -1


def reliability_files(run_dir: Path) -> list[tuple[Path, dict]]:
    """(file, reliability data) of the run's calibration files, the latest evaluation first."""
    files = [*run_dir.glob("reliability_*.json"), *run_dir.glob("eval/*reliability*.json")]
    out = []
    for f in sorted(files, key=lambda p: (p.stat().st_mtime, _step_of_file(p)), reverse=True):
        data = _find_reliability(_read_json(f))
        if data is not None:
            out.append((f, data))
    return out


# --- numbers ----------------------------------------------------------------------------------------------------------
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] of every finite number logged under keys starting with `prefix`, in step order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for key, value in rec.items():
            if key != "step" and key.startswith(prefix) and _number(value):
                out.setdefault(key, []).append((rec["step"], float(value)))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def is_baseline(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1].startswith(BASELINE_PREFIXES)


def baseline_keys(metric: str, keys) -> list[str]:
    """The baselines among `keys` that belong to `metric` (eval/random_accuracy to eval/accuracy, same prefix)."""
    head, _, name = metric.rpartition("/")
    return [k for k in keys if is_baseline(k) and k.rpartition("/")[0] == head
            and k.rsplit("/", 1)[-1].split("_", 1)[1] == name]


def lower_is_better(metric: str, task: str | None = None) -> bool:
    """The direction of a metric: the task's declaration (config METRICS), else by its name."""
    name = metric.removeprefix("eval/")
    if task:
        try:
            from app.tasks import task_metrics

            declared = task_metrics(task)
        except UserError:
            declared = {}
        if name in declared:
            return declared[name] == "min"
    last = name.rsplit("/", 1)[-1].lower()
    return any(word in last for word in _LOWER_IS_BETTER)


@dataclass
class MetricSummary:
    metric: str  # eval/<name>
    best: float
    best_step: int
    final: float
    final_step: int
    lower_is_better: bool
    baselines: dict[str, float]  # random_accuracy -> value (at the final evaluation)


def metric_summaries(run: Run) -> list[MetricSummary]:
    """Best and final value of every evaluation metric (baselines beside the metric they belong to)."""
    evals = series(run.records, "eval/")
    out = []
    for key, points in evals.items():
        if is_baseline(key):
            continue
        low = lower_is_better(key, run.task)
        best_step, best = (min if low else max)(points, key=lambda p: p[1])
        baselines = {b.rsplit("/", 1)[-1]: evals[b][-1][1] for b in baseline_keys(key, evals)}
        out.append(MetricSummary(key, best, best_step, points[-1][1], points[-1][0], low, baselines))
    majority = majority_baseline(run)
    for s in out:
        if majority is not None and s.metric == "eval/accuracy" and not s.baselines:
            s.baselines = majority
    return out


def majority_baseline(run: Run) -> dict[str, float] | None:
    """For a binary-label task (nli_cot): the majority class's share of the dev labels and a random pick's 0.5."""
    dev = run.config.get("dev_file")
    if run.task != "nli_cot" or not dev or not Path(dev).is_file():
        return None
    from app.data import read_rows

    try:
        labels = [str(r.values.get("label")).strip() for r in read_rows(dev)]
    except UserError:
        return None
    rows = run.config.get("eval_rows")
    labels = labels[:rows] if rows else labels
    if not labels:
        return None
    return {"majority_accuracy": max(labels.count(v) for v in set(labels)) / len(labels), "random_accuracy": 0.5}


@dataclass
class Timing:
    wall_s: float | None
    approximate: bool
    steps_per_s: float | None
    tokens_per_s: float | None
    peak_host_mb: float | None
    peak_gpu_mb: float | None


def timing(run: Run) -> Timing:
    """Wall time over the run's invocations (run_info.json; else the files' times, marked approximate), steps/s over
    it, the mean logged tokens/s, the peak memories of its invocations."""
    invocations = (run.info or {}).get("invocations") or []
    wall, approximate = None, False
    if invocations:
        wall = 0.0
        for inv in invocations:
            if inv.get("wall_s") is not None:
                wall += inv["wall_s"]
            elif inv.get("status") == "running" and inv.get("started_unix"):
                wall += time.time() - inv["started_unix"]  # the one going now
    elif (run.path / "run_config.json").is_file() and (run.path / "metrics.jsonl").is_file():
        wall = (run.path / "metrics.jsonl").stat().st_mtime - (run.path / "run_config.json").stat().st_mtime
        approximate = True
    tps = [v for _, v in series(run.records, "tokens_per_s").get("tokens_per_s", [])]
    peaks = lambda key: max((i[key] for i in invocations if i.get(key) is not None), default=None)  # noqa: E731
    return Timing(wall, approximate, run.last_step / wall if wall else None,
                  sum(tps) / len(tps) if tps else None, peaks("peak_host_mb"), peaks("peak_gpu_mb"))


def config_marks(run: Run) -> dict[str, str]:
    """field -> why it is marked: changed from its base config (run_info's origin), else differs from the task's
    defaults."""
    origin = (run.info or {}).get("config_origin")
    if origin:
        base = origin.get("base_config") or "the defaults"
        return {k: f"base ({base}): {_short(v.get('base'))}; set at {v.get('set_at')}"
                for k, v in (origin.get("changed") or {}).items()}
    defaults = task_defaults(run.task)
    return {k: f"default: {_short(defaults[k])}" for k, v in run.config.items() if k in defaults and v != defaults[k]}


def task_defaults(task: str) -> dict:
    from app.config import config_class

    try:
        cls = config_class(task)
    except UserError:
        return {}
    return json.loads(json.dumps({n: f.default for n, f in cls.model_fields.items()}, default=str))


def _short(value, width: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def differing_fields(configs: list[dict]) -> list[str]:
    """The config fields every run has whose values are not all equal, in the first run's order."""
    common = [k for k in configs[0] if all(k in c for c in configs[1:])]
    return [k for k in common if any(json.dumps(c[k], sort_keys=True, default=str)
                                     != json.dumps(configs[0][k], sort_keys=True, default=str) for c in configs[1:])]
