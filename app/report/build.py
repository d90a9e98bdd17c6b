"""`python -m app report RUN_DIR [RUN_DIR ...] [--output report.md]`: the page of one run, or the comparison of
several, as Markdown with its figures in `<stem>_files/` beside it and as one HTML file (`<stem>.html`).

One run: where and how it ran, the config (fields changed from its base marked), data, time, curves, every
evaluation metric over steps, best and final metrics with baselines, calibration, warnings. Several runs: one table
of the config fields that differ, best/final metrics and time (the best of each column marked), overlaid curves.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from app.atomic import write_atomic
from app.errors import UserError
from app.report import collect, figures, page
from app.report.collect import Run

SAME_BY_NATURE = ("out_dir",)  # differs between any two runs: the run's name says it


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.{digits}f}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def fmt_setting(value) -> str:
    """A config value as written in a config file (no rounding, no thousands separator)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return fmt(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- one run ----------------------------------------------------------------------------------------------------------
def environment_blocks(run: Run) -> list:
    env = (run.info or {}).get("environment")
    if not env:
        return [("p", "Not recorded: this run predates `run_info.json` (host, versions, commit).")]
    git = env.get("git") or {}
    versions = env.get("versions") or {}
    started = ((run.info.get("invocations") or [{}])[0]).get("started")
    rows = [["commit", (git.get("commit") or "not a git checkout")[:12] + (" (with local changes)" if git.get("dirty")
                                                                         else "")],
            ["started", started or "—"], ["host", env.get("host")], ["platform", env.get("platform")],
            ["CPU", f"{env.get('cpu')} ({env.get('cpu_count')} cores)"],
            ["GPU", ", ".join(env.get("gpus") or []) or "none"],
            ["processes", f"{env.get('processes')}" + (" (FSDP2)" if env.get("sharded") else "")],
            ["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)],
            ["command", " ".join(env.get("command") or [])]]
    return [("table", ["", "value"], rows, set())]


def config_blocks(run: Run) -> list:
    if not run.config:
        return [("p", "No run_config.json.")]
    marks = collect.config_marks(run)
    origin = (run.info or {}).get("config_origin")
    what = (f"`{origin['config_file']}` on base `{origin.get('base_config') or 'the defaults'}`"
            + (f", overrides {' '.join(origin['overrides'])}" if origin.get("overrides") else "")
            if origin else "no config file recorded: marked fields differ from the task's defaults")
    changed = [[k, fmt_setting(run.config[k]), marks[k]] for k in run.config if k in marks]
    rest = [[k, fmt_setting(v)] for k, v in run.config.items() if k not in marks]
    return [("p", f"{len(changed)} fields changed ({what})."),
            ("table", ["field", "value", "was"], changed, {(i, 1) for i in range(len(changed))}),
            ("details", f"the other {len(rest)} fields", [("table", ["field", "value"], rest, set())])]


def data_blocks(run: Run) -> list:
    data = (run.info or {}).get("data")
    if not data:
        return [("p", "Not recorded (rows, tokens, over-length cut, padding share and token cache come from "
                      "`run_info.json`, which this run predates).")]
    rows = []
    for split in ("train", "dev"):
        d = data.get(split) or {}
        if d.get("rows"):
            rows.append([split, d.get("file"), fmt(d.get("rows")), fmt(d.get("examples")), fmt(d.get("tokens")),
                         f"{d.get('over_length', 0)} ({d.get('overlength')})", d.get("token_cache") or "—"])
    share = data.get("padding_share")
    return [("table", ["split", "file", "rows", "examples", "tokens", f"over {data.get('max_seq_length')} tokens",
                       "token cache"], rows, set()),
            ("p", f"Padding share of the first epoch's micro batches: {'—' if share is None else f'{share:.1%}'}; "
                  f"{data.get('steps_per_epoch')} steps per epoch.")]


def time_blocks(run: Run) -> list:
    t = collect.timing(run)
    size = sum(n for _, n in run.checkpoints)
    invocations = (run.info or {}).get("invocations") or []
    rows = [["wall time", fmt_duration(t.wall_s) + (" (from file times)" if t.approximate else "")
             + (f" over {len(invocations)} invocations" if len(invocations) > 1 else "")],
            ["steps", f"{run.last_step:,}"],
            ["steps/s", fmt(t.steps_per_s, 3)], ["tokens/s (mean of logged)", fmt(t.tokens_per_s, 0)],
            ["peak host memory", "not recorded" if t.peak_host_mb is None else f"{t.peak_host_mb:,.0f} MiB"],
            ["peak GPU memory", "not recorded (no GPU)" if t.peak_gpu_mb is None else f"{t.peak_gpu_mb:,.0f} MiB"],
            ["checkpoints", f"{len(run.checkpoints)} ({', '.join(n for n, _ in run.checkpoints)}), {fmt_bytes(size)}"]]
    return [("table", ["", "value"], rows, set())]


def metric_blocks(run: Run) -> list:
    summaries = collect.metric_summaries(run)
    if not summaries:
        return [("p", "No evaluation logged.")]
    rows = [[s.metric.removeprefix("eval/"), fmt(s.best), f"{s.best_step:,}", fmt(s.final), f"{s.final_step:,}",
             "lower" if s.lower_is_better else "higher",
             ", ".join(f"{k} {fmt(v)}" for k, v in s.baselines.items()) or "—"] for s in summaries]
    return [("table", ["metric", "best", "at step", "final", "at step", "better", "baselines"], rows,
             {(i, 1) for i in range(len(rows))})]


def calibration_blocks(run: Run, figs: dict[str, bytes]) -> list:
    if not run.calibration:
        return []
    path, data = run.calibration[0]
    rows = [[f"{b['lower']:.2f}-{b['upper']:.2f}", fmt(b.get("count")), fmt(b.get("accuracy")),
             fmt(b.get("mean_confidence"))] for b in data["bins"]]
    blocks = [("h", 2, "Calibration"), ("p", f"Latest evaluation: `{path.relative_to(run.path)}`.")]
    try:
        figs["calibration.png"] = figures.reliability_png(data)
        blocks.append(("img", "calibration.png", "reliability diagram"))
    except ValueError:
        pass
    return blocks + [("table", ["confidence bin", "samples", "accuracy", "mean confidence"], rows, set())]


def status_line(run: Run) -> str:
    return f"**{run.status}**: {run.status_note}. Task `{run.task}`, directory `{run.path}`."


def run_page(run: Run) -> tuple[list, dict[str, bytes]]:
    figs: dict[str, bytes] = {}
    blocks: list = [("h", 1, f"Run report: {run.name}"), ("p", status_line(run)),
                    ("h", 2, "Where and how it ran"), *environment_blocks(run),
                    ("h", 2, "Config"), *config_blocks(run),
                    ("h", 2, "Data"), *data_blocks(run),
                    ("h", 2, "Time"), *time_blocks(run),
                    ("h", 2, "Curves")]
    curves = figures.training_curves_png(run)
    if curves:
        figs["curves.png"] = curves
        blocks.append(("img", "curves.png", "loss and learning rate"))
    evals = figures.eval_metrics_png(run)
    if evals:
        figs["eval_metrics.png"] = evals
        blocks.append(("img", "eval_metrics.png", "evaluation metrics over steps"))
    if not curves and not evals:
        blocks.append(("p", "Nothing logged yet."))
    blocks += [("h", 2, "Best and final metrics"), *metric_blocks(run), *calibration_blocks(run, figs),
               ("h", 2, "Warnings")]
    blocks.append(("pre", "\n".join(run.warnings)) if run.warnings else
                  ("p", "None logged." if (run.path / "warnings.log").exists() or run.info else
                   "Not recorded (no warnings.log: this run predates it)."))
    return blocks, figs


# --- several runs -----------------------------------------------------------------------------------------------------
def comparison_table(runs: list[Run]) -> tuple[list[str], list[list], set, int]:
    """Header, rows (one per run) and the best cell of each metric column: the differing config fields, best and
    final of every evaluation metric the runs share, and wall time."""
    fields = [f for f in collect.differing_fields([r.config for r in runs]) if f not in SAME_BY_NATURE]
    per_run = [{s.metric: s for s in collect.metric_summaries(r)} for r in runs]
    shared = [m for m in per_run[0] if all(m in p for p in per_run[1:])]
    header = ["run", "status", *fields]
    columns: list[tuple[str, list, bool]] = []  # (title, values, lower is better)
    for m in shared:
        low = per_run[0][m].lower_is_better
        columns.append((f"{m.removeprefix('eval/')} best", [p[m].best for p in per_run], low))
        columns.append((f"{m.removeprefix('eval/')} final", [p[m].final for p in per_run], low))
    walls = [collect.timing(r).wall_s for r in runs]
    columns.append(("wall time", walls, True))
    header += [c[0] for c in columns]
    rows, marked = [], set()
    for i, run in enumerate(runs):
        rows.append([run.name, run.status, *(fmt_setting(run.config[f]) for f in fields),
                     *(fmt_duration(c[1][i]) if c[0] == "wall time" else fmt(c[1][i]) for c in columns)])
    for j, (_, values, low) in enumerate(columns):
        present = [v for v in values if v is not None]
        if len(present) > 1 and len(set(present)) > 1:
            best = (min if low else max)(present)
            marked |= {(i, 2 + len(fields) + j) for i, v in enumerate(values) if v == best}
    return header, rows, marked, len(fields)


def comparison_page(runs: list[Run]) -> tuple[list, dict[str, bytes]]:
    header, rows, marked, n_fields = comparison_table(runs)
    tasks = sorted({r.task for r in runs})
    blocks: list = [("h", 1, f"Comparison of {len(runs)} runs"),
                    ("p", f"Tasks: {', '.join(tasks)}. Columns: the {n_fields} config fields that differ between the "
                          "runs (of the fields they all have), then the best and final value of each evaluation "
                          "metric they share, and the wall time; the best value of each column is in bold."),
                    ("table", header, rows, marked), ("h", 2, "Runs")]
    blocks.append(("table", ["run", "task", "status", "directory"],
                   [[r.name, r.task, f"{r.status}: {r.status_note}", str(r.path)] for r in runs], set()))
    figs: dict[str, bytes] = {}
    losses = sorted({k for r in runs for k in collect.series(r.records) if k == "loss" or k.startswith("loss/")})
    png = figures.overlay_png(runs, losses + ["lr"], "Training loss and learning rate")
    if png:
        figs["compare_training.png"] = png
        blocks += [("h", 2, "Training curves"), ("img", "compare_training.png", "training curves of every run")]
    shared = [k for k in collect.series(runs[0].records, "eval/") if not collect.is_baseline(k)
              and all(k in collect.series(r.records, "eval/") for r in runs[1:])]
    png = figures.overlay_png(runs, shared, "Evaluation metrics")
    if png:
        figs["compare_eval.png"] = png
        blocks += [("h", 2, "Evaluation metrics"), ("img", "compare_eval.png", "evaluation metrics of every run")]
    return blocks, figs


# --- the command ------------------------------------------------------------------------------------------------------
def default_output(runs: list[Path]) -> Path:
    return runs[0] / "report.md" if len(runs) == 1 else Path("report.md")


RUN_PARTS = {"checkpoints", "tensorboard", "token_cache", "eval"}  # folders a run writes into


def check_output(output: Path, runs: list[Path]) -> None:
    """Refuse, before any work, an output that is not .md, is a directory, or would land inside a run's folders."""
    if output.suffix.lower() != ".md":
        raise UserError(f"--output {output}: give a Markdown path ending in .md (the HTML page goes beside it)")
    if output.is_dir():
        raise UserError(f"--output {output}: is a directory; give a file path such as {output / 'report.md'}")
    t = output.resolve()
    for run in runs:
        r = run.resolve()
        if r in t.parents and t.relative_to(r).parts[0] in RUN_PARTS:
            raise UserError(f"--output {output}: inside {run}/{t.relative_to(r).parts[0]}/, which the run writes; "
                            f"write the report beside it (e.g. {run / 'report.md'})")


def flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, scalar) pairs of a JSON value; lists longer than 8 shown by their length."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and (len(value) > 8 or any(isinstance(v, (dict, list)) for v in value)):
        return [(prefix, f"[{len(value)} items]")]
    return [(prefix, value)]


def read_attachments(attach: list[str]) -> list[tuple[str, list[tuple[str, object]]]]:
    """`TITLE=FILE.json` (or FILE.json) -> (title, flattened pairs); a missing or broken file is one line."""
    out = []
    for item in attach:
        title, _, name = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        try:
            data = json.loads(Path(name).read_text(encoding="utf-8"))
        except OSError as err:
            raise UserError(f"--attach {name}: cannot read ({err.strerror or err})") from None
        except ValueError as err:
            raise UserError(f"--attach {name}: not JSON ({err})") from None
        out.append((title, flatten(data)))
    return out


def attachment_blocks(attachments) -> list:
    blocks = []
    for title, pairs in attachments:
        blocks += [("h", 2, title), ("table", ["result", "value"], [[k, fmt(v)] for k, v in pairs], set())]
    return blocks


def write_report(run_dirs: list[str], output: str | None = None, attach: list[str] = ()) -> dict:
    """Write the Markdown page, its figures and the HTML page; return their paths. `attach`: JSON result files of
    the same experiment (scores, data statistics) shown as tables at the end."""
    runs_paths = collect.find_runs(run_dirs)
    out = Path(output) if output else default_output(runs_paths)
    check_output(out, runs_paths)
    attachments = read_attachments(list(attach))
    runs = [collect.load_run(p) for p in runs_paths]
    blocks, figs = run_page(runs[0]) if len(runs) == 1 else comparison_page(runs)
    blocks += attachment_blocks(attachments)
    blocks.append(("p", f"Written {time.strftime('%Y-%m-%d %H:%M')} by `python -m app report`."))
    stem = out.with_suffix("")
    fig_dir = stem.with_name(stem.name + "_files")
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    if figs:
        fig_dir.mkdir(parents=True)
    for name, blob in figs.items():
        write_atomic(fig_dir / name, blob)
    write_atomic(out, page.to_markdown(blocks, fig_dir.name))
    html_path = stem.with_suffix(".html")
    write_atomic(html_path, page.to_html(blocks, figs, blocks[0][2]))
    return {"markdown": out, "html": html_path, "figures": sorted(fig_dir / n for n in figs)}
