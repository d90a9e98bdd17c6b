"""Per-step metrics of the confidence_head task (numpy only): error, correlation and ranking of the scores against the
step labels, and their calibration against label >= 0.5 (a correct step)."""

from __future__ import annotations

import math

import numpy as np

from app.metrics.calibration import calibration_report


def rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    return float(np.dot(dx, dy) / denom) if denom > 0 else math.nan


def spearman(x, y) -> float:
    return pearson(rank_average(np.asarray(x, np.float64)), rank_average(np.asarray(y, np.float64)))


def auroc(scores, positive) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half); NaN with one class only."""
    s, pos = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rank_average(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def step_metrics(scores, labels, n_bins: int = 10) -> dict:
    """MSE, MAE, Pearson, Spearman, AUROC (label >= 0.5 is a correct step), calibration (equal-width ECE of the
    scores against label >= 0.5, Brier) over labelled steps. NaN where a metric is undefined."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    out = {"steps": float(len(s))}
    if len(s) == 0:
        return {**out, **{k: math.nan for k in ("mse", "mae", "pearson", "spearman", "auroc", "ece", "brier")}}
    correct = (y >= 0.5).astype(np.float64)
    report = calibration_report(np.clip(s, 0.0, 1.0), correct, n_bins=n_bins)
    out.update(mse=float(np.mean((s - y) ** 2)), mae=float(np.mean(np.abs(s - y))), pearson=pearson(s, y),
               spearman=spearman(s, y), auroc=auroc(s, correct), ece=report["ece_l1"], brier=report["brier"])
    return out


def labelled_pairs(rows_labels: list[list], rows_scores: list[list]) -> tuple[list[float], list[float]]:
    scores, labels = [], []
    for labs, scs in zip(rows_labels, rows_scores):
        for y, s in zip(labs, scs):
            if y is not None and s is not None:
                scores.append(s)
                labels.append(y)
    return scores, labels
