"""PNG plots drawn with matplotlib: reliability diagrams and training curves.

matplotlib is a default dependency, imported only inside the functions that draw (an environment without it skips
the PNGs with one line naming the install, :func:`app.packages.install_hint`), so importing this module (or :mod:`app.metrics.calibration`, which re-exports
:func:`save_reliability_png`) never imports it. Figures are built on matplotlib's Agg canvas directly, without
pyplot, so no global backend is selected and nothing interactive is opened. Every PNG is written atomically
(:func:`app.atomic.write_atomic`).

* :func:`render_reliability_png` / :func:`save_reliability_png`: the reliability diagram of
  :func:`app.metrics.calibration.reliability_data`: per equal-width bin the accuracy as a bar, the gap to the bin's
  mean confidence (shaded, with the mean confidence marked), the diagonal of perfect calibration, and below it a
  histogram of how many samples fall in each bin; the title gives the ECE of these bins, the accuracy, the mean
  confidence and the number of samples.
* :func:`save_training_curves`: ``training_curves.png`` next to a run's ``metrics.jsonl``: every logged training
  loss (keys starting with ``loss``) and the evaluation losses (``eval/dev_loss`` ...) per step, and the learning
  rate in a second panel.

Without matplotlib a plot is skipped, never an error: :func:`save_reliability_png` logs one warning (once per
process) naming the extra and returns ``None``, :func:`save_training_curves` logs one info line and returns
``None``. A training run never fails over a plot.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from app.atomic import write_atomic
from app.errors import UserError
from app.packages import install_hint

__all__ = [
    "INSTALL_HINT",
    "TRAINING_CURVES_NAME",
    "read_metrics",
    "render_reliability_png",
    "render_training_curves_png",
    "save_reliability_png",
    "save_training_curves",
]

log = logging.getLogger(__name__)

INSTALL_HINT = install_hint("matplotlib")
TRAINING_CURVES_NAME = "training_curves.png"
#: Smallest accepted side of a reliability diagram, in pixels.
MIN_SIZE = 200

_ACC, _ACC_EDGE, _GAP, _CONF, _DIAG, _HIST = "#4682b4", "#27496d", "#d73c32", "#a01e16", "#6e6e6e", "#8c8c8c"
_warned_missing = False


def _matplotlib():
    """``(Figure, FigureCanvasAgg)``; raises ImportError when matplotlib is not installed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def _plain_log_axis(ax) -> None:
    """Log scale on y with ticks at 1, 2, 5 per decade, labelled as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _png(fig, canvas_cls) -> bytes:
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Reliability diagram
# ----------------------------------------------------------------------------------------------------------------


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"reliability data: {what} must be a finite number, got {value!r}")
    return float(value)


def _reliability_bins(data: Mapping[str, Any]) -> list[dict]:
    """The non-empty bins as dicts of floats, checked; ValueError for data not shaped like reliability_data's."""
    bins = data.get("bins") if isinstance(data, Mapping) else None
    if not isinstance(bins, (list, tuple)) or not bins:
        raise ValueError("reliability data needs a non-empty 'bins' list (see reliability_data)")
    out = []
    for i, b in enumerate(bins):
        if not isinstance(b, Mapping):
            raise ValueError(f"reliability data: bin {i} is not a mapping: {b!r}")
        lower, upper = _num(b.get("lower"), f"bin {i} lower"), _num(b.get("upper"), f"bin {i} upper")
        count = b.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"reliability data: bin {i} count must be an integer >= 0, got {count!r}")
        if not count or b.get("accuracy") is None or b.get("mean_confidence") is None:
            out.append({"lower": lower, "upper": upper, "count": 0, "accuracy": None, "confidence": None})
            continue
        out.append({"lower": lower, "upper": upper, "count": count,
                    "accuracy": min(max(_num(b["accuracy"], f"bin {i} accuracy"), 0.0), 1.0),
                    "confidence": min(max(_num(b["mean_confidence"], f"bin {i} mean_confidence"), 0.0), 1.0)})
    return out


def render_reliability_png(data: Mapping[str, Any], size: int = 600) -> bytes:
    """The reliability diagram of ``data`` (from :func:`app.metrics.calibration.reliability_data`) as PNG bytes.

    ``size`` is the side of the square image in pixels (the layout is the same at every size; only the
    resolution changes). Raises ValueError for malformed ``data`` or a ``size`` under 200, ImportError when
    matplotlib is not installed.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer of at least {MIN_SIZE} pixels, got {size!r}")
    bins = _reliability_bins(data)
    Figure, canvas_cls = _matplotlib()

    full = [b for b in bins if b["count"]]
    n = sum(b["count"] for b in full)
    ece = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in full) if n else 0.0
    mce = max((abs(b["accuracy"] - b["confidence"]) for b in full), default=0.0)

    fig = Figure(figsize=(6.0, 6.0), dpi=size / 6.0, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3.2, 1.0]})

    lefts = [b["lower"] for b in full]
    widths = [b["upper"] - b["lower"] for b in full]
    accs = [b["accuracy"] for b in full]
    confs = [b["confidence"] for b in full]
    top.bar(lefts, accs, width=widths, align="edge", color=_ACC, edgecolor=_ACC_EDGE, linewidth=0.8,
            label="Accuracy", zorder=2)
    # The gap spans accuracy..mean confidence: filled light red above an over-confident bar, only hatched where it
    # lies inside an under-confident one (so the bar keeps its colour).
    fills = [(0.843, 0.235, 0.196, 0.28) if c > a else "none" for a, c in zip(accs, confs)]
    top.bar(lefts, [c - a for a, c in zip(accs, confs)], bottom=accs, width=widths, align="edge", color=fills,
            edgecolor=_GAP, linewidth=0.8, hatch="//", label="Gap to mean confidence", zorder=3)
    top.hlines(confs, lefts, [lo + w for lo, w in zip(lefts, widths)], colors=_CONF, linewidth=2.0,
               label="Mean confidence", zorder=4)
    top.plot([0, 1], [0, 1], linestyle="--", color=_DIAG, linewidth=1.2, label="Perfect calibration", zorder=5)
    top.set_xlim(0.0, 1.0)
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("Accuracy")
    top.set_aspect("auto")
    top.grid(True, color="#e1e1e1", linewidth=0.6, zorder=0)
    top.legend(loc="best", fontsize="small", framealpha=0.9)
    top.tick_params(labelbottom=False)

    n_samples = data.get("num_samples", n)
    subtitle = [f"ECE {ece:.3f}", f"MCE {mce:.3f}"]
    if isinstance(data.get("accuracy"), (int, float)):
        subtitle.append(f"accuracy {data['accuracy']:.3f}")
    if isinstance(data.get("mean_confidence"), (int, float)):
        subtitle.append(f"mean confidence {data['mean_confidence']:.3f}")
    subtitle.append(f"n = {n_samples}")
    top.set_title(f"Reliability diagram ({len(bins)} bins)\n" + " · ".join(subtitle), fontsize="medium")

    all_lefts = [b["lower"] for b in bins]
    all_widths = [b["upper"] - b["lower"] for b in bins]
    counts = [b["count"] for b in bins]
    hist = bottom.bar(all_lefts, counts, width=all_widths, align="edge", color=_HIST, edgecolor="#505050",
                      linewidth=0.6, zorder=2)
    if len(bins) <= 20:
        bottom.bar_label(hist, labels=[str(c) if c else "" for c in counts], fontsize="x-small", padding=1)
    bottom.set_ylim(0, max(counts) * 1.3 if max(counts) else 1)
    bottom.set_xlim(0.0, 1.0)
    bottom.set_xlabel("Confidence")
    bottom.set_ylabel("Samples")
    bottom.grid(True, axis="y", color="#e1e1e1", linewidth=0.6, zorder=0)
    return _png(fig, canvas_cls)


def save_reliability_png(data: Mapping[str, Any], path: str | os.PathLike, size: int = 600) -> Path | None:
    """Write the reliability diagram of ``data`` (see :func:`render_reliability_png`) as a PNG, atomically.

    Returns the path, or ``None`` (after one warning per process naming the install) when matplotlib is
    not installed. Malformed ``data`` raises ValueError.
    """
    global _warned_missing
    try:
        blob = render_reliability_png(data, size)
    except ImportError as exc:
        if not _warned_missing:
            _warned_missing = True
            log.warning("reliability diagrams need matplotlib (%s); skipping the PNGs: %s", exc, INSTALL_HINT)
        else:
            log.debug("matplotlib is not installed; skipping %s", path)
        return None
    return write_atomic(path, blob)


# ----------------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl: JSON objects with an integer ``step``; other lines (a torn last line,
    blank lines, anything not a JSON object) are skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                continue
            records.append(rec)
    return records


def _is_training_loss(key: str) -> bool:
    return key.startswith("loss")


def _is_eval_loss(key: str) -> bool:
    if not key.startswith("eval/"):
        return False
    last = key.rsplit("/", 1)[-1]
    return last.startswith("loss") or last.endswith("loss")


def _series(records: list[dict]) -> tuple[dict[str, list], dict[str, list], list]:
    """(training losses, eval losses, learning rate) as {key: [(step, value)]}, finite numbers only, by step."""
    train: dict[str, list] = {}
    evals: dict[str, list] = {}
    lr: list = []
    for rec in records:
        step = rec["step"]
        for key, value in rec.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if _is_training_loss(key):
                train.setdefault(key, []).append((step, float(value)))
            elif _is_eval_loss(key):
                evals.setdefault(key, []).append((step, float(value)))
            elif key == "lr":
                lr.append((step, float(value)))
    sort = lambda pts: sorted(pts, key=lambda p: p[0])  # noqa: E731
    return ({k: sort(v) for k, v in sorted(train.items())}, {k: sort(v) for k, v in sorted(evals.items())},
            sort(lr))


def render_training_curves_png(records: list[dict], title: str = "Training curves") -> bytes | None:
    """PNG bytes of the loss and learning-rate panels for metrics.jsonl ``records``; ``None`` when they hold no
    loss and no learning rate. Raises ImportError when matplotlib is not installed."""
    train, evals, lr = _series(records)
    if not train and not evals and not lr:
        return None
    Figure, canvas_cls = _matplotlib()
    panels = (1 if train or evals else 0) + (1 if lr else 0)
    fig = Figure(figsize=(10.0, 4.0 + 2.4 * panels), dpi=100, layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [2.0, 1.0] if panels == 2 else [1.0]})[:, 0]
    fig.suptitle(title)

    if train or evals:
        ax = axes[0]
        values = []
        for key, pts in train.items():
            steps, ys = zip(*pts)
            ax.plot(steps, ys, linewidth=1.3, marker="." if len(pts) < 40 else None, label=f"train {key}")
            values += ys
        for key, pts in evals.items():
            steps, ys = zip(*pts)
            ax.plot(steps, ys, linestyle="--", linewidth=1.0, marker="o", markersize=5, label=key)
            values += ys
        positive = [v for v in values if v > 0]
        if positive and len(positive) == len(values) and max(positive) / min(positive) > 50:
            _plain_log_axis(ax)
        ax.set_ylabel("Loss")
        ax.grid(True, color="#e1e1e1", linewidth=0.6)
        ax.legend(loc="upper right", fontsize="small", framealpha=0.9)

    if lr:
        ax = axes[-1]
        steps, ys = zip(*lr)
        ax.plot(steps, ys, color="#555555", linewidth=1.3, label="learning rate")
        ax.set_ylabel("Learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(True, color="#e1e1e1", linewidth=0.6)
    axes[-1].set_xlabel("Step")
    return _png(fig, canvas_cls)


def save_training_curves(out_dir: str | os.PathLike) -> Path | None:
    """Write ``out_dir/training_curves.png`` from ``out_dir/metrics.jsonl``, atomically; return its path.

    Returns ``None`` with one info line when matplotlib is not installed, when there is no metrics.jsonl or it
    holds nothing to plot, and with one warning line if drawing or writing fails: a finished run never fails
    over its plot.
    """
    out_dir = Path(out_dir)
    metrics = out_dir / "metrics.jsonl"
    try:
        records = read_metrics(metrics)
    except FileNotFoundError:
        log.info("no training curves: %s does not exist", metrics)
        return None
    except OSError as exc:
        log.warning("no training curves: cannot read %s: %s", metrics, exc)
        return None
    try:
        blob = render_training_curves_png(records, title=f"Training curves: {out_dir.resolve().name}")
    except ImportError:
        log.info("no training curves: matplotlib is not installed (%s)", INSTALL_HINT)
        return None
    except Exception as exc:  # noqa: BLE001 - a plot must not fail a finished run
        log.warning("no training curves: drawing %s failed: %s: %s", metrics, type(exc).__name__, exc)
        return None
    if blob is None:
        log.info("no training curves: %s holds no loss or learning rate", metrics)
        return None
    try:
        return write_atomic(out_dir / TRAINING_CURVES_NAME, blob)
    except UserError as exc:  # write_atomic's one line for a path that cannot be written
        log.warning("no training curves: %s", exc)
        return None
