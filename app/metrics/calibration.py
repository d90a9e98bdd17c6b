"""Calibration metrics for confidence scores (numpy only).

Every task that produces a confidence in [0, 1] together with a 0/1 outcome ("was the answer correct",
"is the label positive") can call :func:`calibration_report` and get one JSON-able dict.

Metrics
-------
* **Binned calibration error** of Kumar, Liang & Ma (2019), "Verified Uncertainty Calibration":
  equal-mass bins, ``p`` in 1, 2, ``inf`` (or any real ``p >= 1``), plug-in and debiased estimators.
  With the default binning it returns what ``calibration.get_calibration_error(probs, labels, p, debias)``
  of the ``uncertainty-calibration`` package returns:

  - if the scores look discrete (fewer distinct values than ``n / 4``) every distinct value is its own bin,
    with boundaries at the midpoints between neighbouring values;
  - otherwise the sorted scores are cut into ``min(15, n)`` groups of (almost) equal size (``np.array_split``)
    and the boundaries are the midpoints between neighbouring groups (duplicates dropped, ``1.0`` last);
  - a score goes to the first bin whose upper boundary is ``>=`` the score.

  ``calib_beta=B`` instead asks for equal-mass bins of at least ``B`` samples: ``max(1, n // B)`` groups,
  split as above.

  Estimators, with bin weights ``w_b = n_b / n``, mean score ``s_b`` and mean outcome ``y_b``:

  - plug-in: ``(sum_b w_b |s_b - y_b|^p)^(1/p)``; for ``p = inf``: ``max_b |s_b - y_b|`` over non-empty bins;
  - debiased, ``p = 2``: ``sqrt(max(0, sum_b w_b (|s_b - y_b|^2 - y_b (1 - y_b) / (n_b - 1))))``, bins with
    fewer than 2 samples contributing 0 (the paper's unbiased estimate of the squared error);
  - debiased, other ``p``: ``2 * plugin - mean_r plugin_r``, where ``plugin_r`` replaces each ``y_b`` by a
    draw from ``Normal(y_b, y_b (1 - y_b) / n_b)`` (``resamples`` draws, seeded, so reports are reproducible).
    The reference refuses bins of fewer than 2 samples here; this module computes them (their variance term
    is 0) and skips empty bins.

* **Equal-width ECE** with ``n_bins`` bins and norm ``"l1"`` (ECE), ``"l2"`` (RMS calibration error, the square
  root of the weighted mean squared gap) or ``"max"`` (MCE), equal to torchmetrics'
  ``BinaryCalibrationError(n_bins, norm)`` on float64 inputs: boundaries ``linspace(0, 1, n_bins + 1)`` exactly as
  torch computes them, a score ``c`` in bin ``i`` when ``edge[i] <= c < edge[i + 1]``, and a score of exactly
  ``1.0`` in a bin of its own after the last one (torch's convention; it matters only for scores equal to 1.0).

* **Brier score**: mean of ``(confidence - outcome)^2``.

* **Reliability diagram**: per equal-width bin the mean confidence, accuracy and count (here a score of 1.0
  belongs to the last bin), written as JSON (:func:`save_reliability_json`) or drawn as a PNG with matplotlib by
  :func:`save_reliability_png`, re-exported from :mod:`app.metrics.plots` (matplotlib is the optional ``plots``
  extra, imported only when a PNG is drawn; without it the PNG is skipped with a warning).

Inputs are sequences, numpy arrays or (CPU or not) torch tensors. Bad inputs raise ``ValueError``: different
lengths, no samples, non-finite values, probabilities outside [0, 1], outcomes other than 0/1.
"""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from app.atomic import write_atomic
from app.metrics.plots import save_reliability_png

__all__ = [
    "REFERENCE_NUM_BINS",
    "binned_calibration_error",
    "brier_score",
    "calibration_report",
    "discrete_bin_edges",
    "equal_mass_bin_edges",
    "equal_width_bin_edges",
    "equal_width_calibration_error",
    "is_discrete",
    "reliability_data",
    "save_reliability_json",
    "save_reliability_png",
]

#: Number of equal-mass bins the reference uses for continuous scores.
REFERENCE_NUM_BINS = 15
#: Number of normal resamples of the debiased estimator for p != 2 (as in the reference).
DEFAULT_RESAMPLES = 1000

_NORMS = ("l1", "l2", "max")


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "double"):  # torch tensor, any device / dtype
        x = x.detach().double().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}: {exc}") from None
    return arr


def _check_probs(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values in [{arr.min():.6g}, {arr.max():.6g}]"
        )


def _check_pair(p: np.ndarray, y: np.ndarray, probs_name: str, labels_name: str) -> None:
    """One label per score row, at least one row, scores finite and in [0, 1]."""
    if y.ndim != 1:
        raise ValueError(f"{labels_name} must be one-dimensional, got shape {y.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{probs_name} and {labels_name} differ in length: {p.shape[0]} vs {y.shape[0]}")
    if p.shape[0] == 0:
        raise ValueError(f"{probs_name} is empty: at least one sample is needed")
    _check_probs(p, probs_name)


def _binary_inputs(probs: Any, labels: Any, probs_name: str = "confidences",
                   labels_name: str = "correct") -> tuple[np.ndarray, np.ndarray]:
    """Validate a binary problem: scores of shape (n,) in [0, 1] and outcomes in {0, 1}."""
    p = _to_numpy(probs, probs_name)
    y = _to_numpy(labels, labels_name)
    if p.ndim != 1:
        raise ValueError(f"{probs_name} must be one-dimensional, got shape {p.shape}")
    _check_pair(p, y, probs_name, labels_name)
    if not np.all((y == 0.0) | (y == 1.0)):
        bad = y[~((y == 0.0) | (y == 1.0))][0]
        raise ValueError(f"{labels_name} must be 0/1 (or booleans), found {bad!r}")
    return p, y


def _multiclass_inputs(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate scores of shape (n,) or (n, k) and integer labels of shape (n,)."""
    p = _to_numpy(probs, "probs")
    y = _to_numpy(labels, "labels")
    if p.ndim not in (1, 2):
        raise ValueError(f"probs must have shape (n,) or (n, k), got {p.shape}")
    _check_pair(p, y, "probs", "labels")
    if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
        raise ValueError("labels must be integers")
    top = 1 if p.ndim == 1 else p.shape[1] - 1
    if y.min() < 0 or y.max() > top:
        what = "0 or 1 when probs is one-dimensional" if p.ndim == 1 else f"between 0 and {top}"
        raise ValueError(f"labels must be {what}, got values in [{y.min():g}, {y.max():g}]")
    return p, y


def _check_p(p: float) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"p must be a number >= 1 or inf, got {p!r}") from None
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"p must be >= 1 (1, 2 or inf are usual), got {p}")
    return p


def _check_n_bins(n_bins: Any, name: str = "n_bins") -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n_bins!r}")
    return int(n_bins)


# ----------------------------------------------------------------------------------------------------------------
# Equal-mass / discrete binning (Kumar et al.)
# ----------------------------------------------------------------------------------------------------------------


def equal_mass_bin_edges(probs: Any, num_bins: int) -> np.ndarray:
    """Upper bin boundaries (last one 1.0) of ``num_bins`` equal-mass bins of ``probs``.

    The sorted scores are split into ``min(num_bins, n)`` consecutive groups whose sizes differ by at most one
    (the first ``n % k`` groups one larger); each boundary is the midpoint between the last score of a group and
    the first of the next. Equal boundaries (ties) collapse into one, so fewer bins may result.
    """
    s = np.sort(_to_numpy(probs, "probs").ravel())
    num_bins = _check_n_bins(num_bins, "num_bins")
    if s.size == 0:
        raise ValueError("probs is empty: at least one sample is needed")
    k = min(num_bins, s.size)
    sizes = np.full(k, s.size // k)
    sizes[: s.size % k] += 1
    ends = np.cumsum(sizes)[:-1]  # index of the first score of groups 1..k-1
    mids = (s[ends - 1] + s[ends]) / 2.0
    return np.unique(np.append(mids, 1.0))


def discrete_bin_edges(probs: Any) -> np.ndarray:
    """One bin per distinct score: boundaries at the midpoints between neighbouring distinct values, then 1.0."""
    u = np.unique(_to_numpy(probs, "probs").ravel())
    return np.append((u[:-1] + u[1:]) / 2.0, 1.0)


def is_discrete(probs: Any) -> bool:
    """The reference's test for "output of a binning method": fewer distinct values than n / 4 (every column)."""
    p = _to_numpy(probs, "probs")
    cols = [p] if p.ndim == 1 else [p[:, j] for j in range(p.shape[1])]
    return all(np.unique(c).size < c.shape[0] / 4.0 for c in cols)


def _bin_sums(s: np.ndarray, y: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin count, sum of scores and sum of outcomes; a score goes to the first edge >= it."""
    idx = np.searchsorted(edges, s, side="left")
    m = len(edges)
    counts = np.bincount(idx, minlength=m).astype(np.float64)
    sum_s = np.bincount(idx, weights=s, minlength=m)
    sum_y = np.bincount(idx, weights=y, minlength=m)
    return counts, sum_s, sum_y


def _resample_source(seed: Any):
    if seed is None:
        return np.random  # the global legacy stream, as the reference uses
    if isinstance(seed, np.random.RandomState):
        return seed
    return np.random.RandomState(seed)


def _ce_1d(s: np.ndarray, y: np.ndarray, edges: np.ndarray, p: float, debias: bool,
           rs: Any, resamples: int) -> float:
    counts, sum_s, sum_y = _bin_sums(s, y, edges)
    n = counts.sum()
    nz = counts > 0
    c = counts[nz]
    w = c / n
    s_mean = sum_s[nz] / c
    y_mean = sum_y[nz] / c
    gap = np.abs(s_mean - y_mean)

    if math.isinf(p):
        plugin = float(gap.max())
    else:
        plugin = float(np.dot(w, gap ** p) ** (1.0 / p))
    if not debias:
        return plugin

    if p == 2.0:
        with np.errstate(divide="ignore", invalid="ignore"):
            term = gap ** 2 - y_mean * (1.0 - y_mean) / (c - 1.0)
        term = np.where(c >= 2, term, 0.0)
        return float(max(float(np.dot(w, term)), 0.0) ** 0.5)

    std = np.sqrt(y_mean * (1.0 - y_mean) / c)
    draws = rs.normal(loc=y_mean, scale=std, size=(int(resamples), y_mean.shape[0]))
    diffs = np.abs(draws - s_mean)
    if math.isinf(p):
        resampled = diffs.max(axis=1)
    else:
        resampled = np.power(diffs ** p @ w, 1.0 / p)
    return float(2.0 * plugin - resampled.mean())


def binned_calibration_error(
    probs: Any,
    labels: Any,
    p: float = 2,
    debias: bool = True,
    *,
    calib_beta: int | None = None,
    num_bins: int | None = None,
    mode: str = "marginal",
    seed: Any = 0,
    resamples: int = DEFAULT_RESAMPLES,
) -> float:
    """Calibration error of Kumar, Liang & Ma (2019) with equal-mass bins.

    Args:
        probs: shape (n,): probability that the outcome is 1 (e.g. that the answer is correct); or shape (n, k):
            per-class probabilities.
        labels: shape (n,): 0/1 outcomes, or class indices in [0, k) for 2-D ``probs``.
        p: the Lp norm: 1, 2, ``math.inf`` or any real >= 1.
        debias: the debiased estimator (closed form for p = 2, normal resampling otherwise) or the plug-in one.
        calib_beta: if given, equal-mass bins of at least ``calib_beta`` samples (``max(1, n // calib_beta)`` bins).
        num_bins: if given, that many equal-mass bins. With neither, the reference's choice: one bin per distinct
            value for discrete scores (see :func:`is_discrete`), else ``REFERENCE_NUM_BINS`` equal-mass bins.
        mode: for 2-D ``probs``: ``"marginal"`` (the per-class errors' p-mean; the max for p = inf) or
            ``"top-label"`` (the calibration of the arg-max class's probability).
        seed: the resampling source for debiased p != 2: an int seed, a ``np.random.RandomState``, or ``None`` for
            numpy's global stream (what the reference uses).
        resamples: number of resamples for debiased p != 2.

    Returns:
        The estimated calibration error (a float >= 0, except that the resampling-debiased estimate may dip below
        0 for a well calibrated model).
    """
    p_ = _check_p(p)
    s, y = _multiclass_inputs(probs, labels)
    if calib_beta is not None and num_bins is not None:
        raise ValueError("give calib_beta or num_bins, not both")
    if calib_beta is not None:
        calib_beta = _check_n_bins(calib_beta, "calib_beta")
    if num_bins is not None:
        num_bins = _check_n_bins(num_bins, "num_bins")
    if mode not in ("marginal", "top-label"):
        raise ValueError(f"mode must be 'marginal' or 'top-label', got {mode!r}")
    resamples = _check_n_bins(resamples, "resamples")
    rs = _resample_source(seed)
    n = s.shape[0]

    if calib_beta is not None:
        k = max(1, n // calib_beta)
        edges_of = lambda col: equal_mass_bin_edges(col, k)  # noqa: E731
    elif num_bins is not None:
        edges_of = lambda col: equal_mass_bin_edges(col, num_bins)  # noqa: E731
    elif is_discrete(s):
        edges_of = discrete_bin_edges
    else:
        edges_of = lambda col: equal_mass_bin_edges(col, REFERENCE_NUM_BINS)  # noqa: E731

    def ce(col: np.ndarray, outcome: np.ndarray) -> float:
        return _ce_1d(col, outcome, edges_of(col), p_, debias, rs, resamples)

    if s.ndim == 1:
        return ce(s, y)
    if mode == "top-label":
        top = np.argmax(s, axis=1)
        return ce(s[np.arange(n), top], (top == y).astype(np.float64))
    per_class = [ce(s[:, j], (y == j).astype(np.float64)) for j in range(s.shape[1])]
    if math.isinf(p_):
        return float(max(per_class))
    return float(np.mean(np.power(per_class, p_)) ** (1.0 / p_))


# ----------------------------------------------------------------------------------------------------------------
# Equal-width ECE (torchmetrics' BinaryCalibrationError)
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _linspace_edges(n_bins: int) -> tuple[float, ...]:
    # torch.linspace(0, 1, steps): i * step below the halfway index, 1 - (steps - 1 - i) * step from it on,
    # with step = 1 / (steps - 1) and the multiply-add fused (one rounding), as its compiled kernels do.
    steps = n_bins + 1
    step = 1.0 / n_bins
    half = steps // 2
    fstep = Fraction(step)
    return tuple(
        float(fstep * i) if i < half else float(1 - fstep * (steps - 1 - i)) for i in range(steps)
    )


def equal_width_bin_edges(n_bins: int) -> np.ndarray:
    """``n_bins + 1`` boundaries from 0 to 1, bit for bit those of ``torch.linspace(0, 1, n_bins + 1)`` in float64."""
    return np.array(_linspace_edges(_check_n_bins(n_bins)), dtype=np.float64)


def _equal_width_bins(c: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchmetrics' binning: n_bins + 1 bins, bin i holding edge[i] <= c < edge[i+1], the last one c == 1."""
    edges = equal_width_bin_edges(n_bins)
    idx = np.searchsorted(edges, c, side="right") - 1
    m = len(edges)
    counts = np.bincount(idx, minlength=m).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        conf = np.nan_to_num(np.bincount(idx, weights=c, minlength=m) / counts)
        acc = np.nan_to_num(np.bincount(idx, weights=y, minlength=m) / counts)
    return acc, conf, counts / counts.sum()


def equal_width_calibration_error(confidences: Any, correct: Any, n_bins: int = 15, norm: str = "l1") -> float:
    """Equal-width binned calibration error, as torchmetrics' ``BinaryCalibrationError(n_bins, norm)``.

    ``norm="l1"``: ``sum_b w_b |acc_b - conf_b|`` (ECE); ``"l2"``: ``sqrt(sum_b w_b (acc_b - conf_b)^2)``;
    ``"max"``: ``max_b |acc_b - conf_b|`` (MCE, empty bins count as 0).
    """
    n_bins = _check_n_bins(n_bins)
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {', '.join(_NORMS)}, got {norm!r}")
    c, y = _binary_inputs(confidences, correct)
    acc, conf, prop = _equal_width_bins(c, y, n_bins)
    gap = np.abs(acc - conf)
    if norm == "l1":
        return float(np.sum(gap * prop))
    if norm == "max":
        return float(np.max(gap))
    sq = float(np.sum((acc - conf) ** 2 * prop))
    return math.sqrt(sq) if sq > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Brier score, reliability data, report
# ----------------------------------------------------------------------------------------------------------------


def brier_score(confidences: Any, correct: Any) -> float:
    """Mean squared difference between the confidence and the 0/1 outcome."""
    c, y = _binary_inputs(confidences, correct)
    return float(np.mean((c - y) ** 2))


def reliability_data(confidences: Any, correct: Any, n_bins: int = 10) -> dict:
    """Per equal-width bin: bounds, count, mean confidence and accuracy (``None`` for an empty bin).

    A confidence of exactly 1.0 belongs to the last bin. The dict holds only JSON types.
    """
    n_bins = _check_n_bins(n_bins)
    c, y = _binary_inputs(confidences, correct)
    edges = equal_width_bin_edges(n_bins)
    idx = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_c = np.bincount(idx, weights=c, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    bins = []
    for b in range(n_bins):
        k = int(counts[b])
        bins.append({
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": k,
            "mean_confidence": float(sum_c[b] / k) if k else None,
            "accuracy": float(sum_y[b] / k) if k else None,
        })
    return {
        "n_bins": n_bins,
        "num_samples": int(c.shape[0]),
        "accuracy": float(y.mean()),
        "mean_confidence": float(c.mean()),
        "bins": bins,
    }


def calibration_report(
    confidences: Any,
    correct: Any,
    n_bins: int = 10,
    calib_beta: int | None = None,
    *,
    seed: Any = 0,
    resamples: int = DEFAULT_RESAMPLES,
) -> dict:
    """All calibration numbers for confidences of 0/1 outcomes, as one JSON-able dict.

    Keys:
        ``num_samples``, ``accuracy`` (mean outcome), ``mean_confidence``, ``brier``;
        ``ece_l1``, ``ece_l2``, ``ece_max``: equal-width with ``n_bins`` bins (torchmetrics' definitions);
        ``ce_l1_plugin``, ``ce_l2_plugin``, ``ce_max_plugin``, ``ce_l1_debiased``, ``ce_l2_debiased``,
        ``ce_max_debiased``: Kumar et al. with equal-mass bins of ``calib_beta`` samples, or the reference's binning
        when ``calib_beta`` is None (``ce_l2_debiased`` is then ``get_calibration_error(c, y, p=2)``);
        ``equal_mass_bins``: how many such bins were used; ``n_bins``, ``calib_beta``;
        ``reliability``: :func:`reliability_data` with ``n_bins`` bins.
    """
    n_bins = _check_n_bins(n_bins)
    c, y = _binary_inputs(confidences, correct)
    if calib_beta is not None:
        calib_beta = _check_n_bins(calib_beta, "calib_beta")
        edges = equal_mass_bin_edges(c, max(1, c.shape[0] // calib_beta))
    elif is_discrete(c):
        edges = discrete_bin_edges(c)
    else:
        edges = equal_mass_bin_edges(c, REFERENCE_NUM_BINS)
    rs = _resample_source(seed)
    resamples = _check_n_bins(resamples, "resamples")

    report: dict[str, Any] = {
        "num_samples": int(c.shape[0]),
        "accuracy": float(y.mean()),
        "mean_confidence": float(c.mean()),
        "brier": float(np.mean((c - y) ** 2)),
    }
    for norm in _NORMS:
        report[f"ece_{norm}"] = equal_width_calibration_error(c, y, n_bins, norm)
    for name, p in (("l1", 1.0), ("l2", 2.0), ("max", math.inf)):
        report[f"ce_{name}_plugin"] = _ce_1d(c, y, edges, p, False, rs, resamples)
    for name, p in (("l1", 1.0), ("l2", 2.0), ("max", math.inf)):
        report[f"ce_{name}_debiased"] = _ce_1d(c, y, edges, p, True, rs, resamples)
    counts, _, _ = _bin_sums(c, y, edges)
    report["equal_mass_bins"] = int(np.count_nonzero(counts))
    report["n_bins"] = n_bins
    report["calib_beta"] = calib_beta
    report["reliability"] = reliability_data(c, y, n_bins)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Writing: JSON (the PNG diagram is drawn by app.metrics.plots)
# ----------------------------------------------------------------------------------------------------------------


def save_reliability_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``data`` (e.g. :func:`reliability_data` or a whole report) as JSON, atomically."""
    text = json.dumps(data, indent=2, allow_nan=False)
    return write_atomic(path, (text + "\n").encode("utf-8"))
