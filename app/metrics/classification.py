"""Classification metrics as the course scorer reports them, with scikit-learn's definitions, in numpy.

Per-class precision, recall and F1 are computed over the labels present in gold or predictions (scikit-learn's
default `labels`), with `zero_division=0`; "macro" is their plain mean, "weighted" their mean weighted by gold
support. Matthews correlation uses scikit-learn's multiclass formula and is 0 where it is undefined.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["METRIC_NAMES", "classification_metrics", "format_table"]

# key -> label in the table, in display order
METRIC_NAMES = {
    "accuracy": "accuracy",
    "precision_macro": "precision (macro)",
    "recall_macro": "recall (macro)",
    "f1_macro": "F1 (macro)",
    "precision_weighted": "precision (weighted)",
    "recall_weighted": "recall (weighted)",
    "f1_weighted": "F1 (weighted)",
    "mcc": "Matthews corr. (MCC)",
}


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def classification_metrics(gold: Sequence[int], pred: Sequence[int]) -> dict:
    """accuracy, macro and weighted precision/recall/F1, MCC and n for two equally long label sequences."""
    y_true = np.asarray(gold).ravel()
    y_pred = np.asarray(pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"gold has {y_true.size} labels but pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("no labels to score")

    labels, encoded = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    k = labels.size
    t = encoded[: y_true.size]
    p = encoded[y_true.size :]
    confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k)  # rows: gold, columns: predicted

    tp = np.diag(confusion)
    true_sum = confusion.sum(axis=1)  # support
    pred_sum = confusion.sum(axis=0)

    precision = _divide(tp, pred_sum)
    recall = _divide(tp, true_sum)
    f1 = _divide(2.0 * tp, true_sum.astype(np.float64) + pred_sum)

    weights = true_sum.astype(np.float64)

    # Matthews correlation, as scikit-learn computes it (multiclass form; equals the binary formula for 2 labels).
    t_sum = true_sum.astype(np.float64)
    p_sum = pred_sum.astype(np.float64)
    n_correct = float(np.trace(confusion))
    n = p_sum.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n**2 - np.dot(p_sum, p_sum)
    cov_ytyt = n**2 - np.dot(t_sum, t_sum)
    cov_ypyp_ytyt = cov_ypyp * cov_ytyt
    mcc = 0.0 if cov_ypyp_ytyt == 0 else float(cov_ytyp / np.sqrt(cov_ypyp_ytyt))

    return {
        "n": int(y_true.size),
        "accuracy": float(np.mean(y_true == y_pred)),
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "f1_macro": float(np.mean(f1)),
        "precision_weighted": float(np.average(precision, weights=weights)),
        "recall_weighted": float(np.average(recall, weights=weights)),
        "f1_weighted": float(np.average(f1, weights=weights)),
        "mcc": mcc,
    }


def format_table(metrics: dict) -> str:
    """A short aligned two-column table of the metrics (n first, when present)."""
    rows = []
    if "n" in metrics:
        rows.append(("examples (n)", str(metrics["n"])))
    for key, name in METRIC_NAMES.items():
        if key in metrics:
            rows.append((name, f"{metrics[key]:.4f}"))
    width = max([len("metric")] + [len(name) for name, _ in rows])
    value_width = max([len("value")] + [len(value) for _, value in rows])
    lines = [f"{'metric':<{width}}  {'value':>{value_width}}", f"{'-' * width}  {'-' * value_width}"]
    lines += [f"{name:<{width}}  {value:>{value_width}}" for name, value in rows]
    return "\n".join(lines)
