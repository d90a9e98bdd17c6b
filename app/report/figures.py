"""The report's PNGs (matplotlib on the Agg canvas, as app/metrics/plots.py draws): the loss and learning-rate
curves of one run (app.metrics.plots.render_training_curves_png), its evaluation metrics over steps with their
baselines, the reliability diagram of its latest calibration, and for several runs the same curves overlaid."""

from __future__ import annotations

import math

from app.metrics.plots import _matplotlib, _png, render_reliability_png, render_training_curves_png
from app.report.collect import Run, baseline_keys, is_baseline, series

__all__ = ["eval_metrics_png", "overlay_png", "reliability_png", "training_curves_png"]

DPI = 80


def training_curves_png(run: Run) -> bytes | None:
    return render_training_curves_png(run.records, title=f"Training curves: {run.name}")


def _grid(n: int, width: float = 11.0, row_height: float = 2.8):
    Figure, canvas_cls = _matplotlib()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width, 0.6 + row_height * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, canvas_cls, axes


def eval_metrics_png(run: Run) -> bytes | None:
    """One panel per evaluation metric over steps; a task's random/majority/oracle baselines as dashed lines."""
    evals = series(run.records, "eval/")
    metrics = [k for k in evals if not is_baseline(k)]
    if not metrics:
        return None
    fig, canvas_cls, axes = _grid(len(metrics))
    fig.suptitle(f"Evaluation metrics: {run.name}")
    for ax, key in zip(axes, metrics):
        steps, values = zip(*evals[key])
        ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, color="#27496d")
        for b in baseline_keys(key, evals):
            ax.axhline(evals[b][-1][1], linestyle="--", linewidth=1.0, color="#888888",
                       label=b.rsplit("/", 1)[-1].split("_", 1)[0])
        ax.set_title(key.removeprefix("eval/"), fontsize="small")
        ax.grid(True, color="#e1e1e1", linewidth=0.6)
        ax.tick_params(labelsize="x-small")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    return _png(fig, canvas_cls)


def overlay_png(runs: list[Run], keys: list[str], title: str) -> bytes | None:
    """One panel per key with every run's curve on it (training loss, each common evaluation metric)."""
    per_run = [series(r.records) for r in runs]
    keys = [k for k in keys if any(k in s for s in per_run)]
    if not keys:
        return None
    fig, canvas_cls, axes = _grid(len(keys))
    fig.suptitle(title)
    for ax, key in zip(axes, keys):
        for run, s in zip(runs, per_run):
            if key in s:
                steps, values = zip(*s[key])
                ax.plot(steps, values, linewidth=1.1, marker="o" if len(steps) < 30 else None, markersize=3,
                        label=run.name)
        ax.set_title(key, fontsize="small")
        ax.grid(True, color="#e1e1e1", linewidth=0.6)
        ax.tick_params(labelsize="x-small")
    axes[0].legend(fontsize="x-small")
    return _png(fig, canvas_cls)


def reliability_png(data: dict) -> bytes:
    return render_reliability_png(data, size=480)
