"""Ranking metrics of one evaluation (numpy only), with the random-pick and oracle baselines beside them.

Per question, with scores s, rewards r (best r* = max r) and exact-match flags e:
  accuracy       the pick (argmax s; the first on ties) has the best reward
  reward_ratio   r[pick] / r* (questions whose best reward is 0 count 1)
  avg_reward     r[pick]
  mrr            1 / rank of the first best-reward candidate in score order
  ndcg           NDCG@K with gains r (log2 discount)
  exec_accuracy  the pick is an exact FinQA execution match (5 decimals), apart from the tolerant reward
random_*: the expected value of a uniform pick; oracle_*: of a pick of a best-reward candidate.
"""

from __future__ import annotations

import math

import numpy as np

NAMES = ("accuracy", "reward_ratio", "avg_reward", "mrr", "ndcg", "exec_accuracy")


def _dcg(gains: np.ndarray) -> float:
    return float(np.sum(gains / np.log2(np.arange(2, len(gains) + 2))))


def _random_mrr(k: int, m: int) -> float:
    """E[1 / rank of the first of m best among k] under a uniform order."""
    return float(sum(math.comb(k - j, m - 1) / math.comb(k, m) / j for j in range(1, k - m + 2)))


def question_metrics(scores, rewards, exact=None) -> dict:
    s, r = np.asarray(scores, np.float64), np.asarray(rewards, np.float64)
    e = np.asarray(exact if exact is not None else (r >= 1.0), bool)
    best = r.max()
    order = np.argsort(-s, kind="stable")
    pick = int(order[0])
    tied = r >= best - 1e-9
    first_best = int(np.nonzero(tied[order])[0][0]) + 1
    ideal = _dcg(np.sort(r)[::-1])
    ratio = (lambda x: x / best if best > 0 else 1.0)
    return {
        "accuracy": float(tied[pick]), "reward_ratio": ratio(r[pick]), "avg_reward": float(r[pick]),
        "mrr": 1.0 / first_best, "ndcg": _dcg(r[order]) / ideal if ideal > 0 else 1.0,
        "exec_accuracy": float(e[pick]), "pick": pick,
        "random_accuracy": float(tied.mean()), "random_reward_ratio": ratio(float(r.mean())),
        "random_mrr": _random_mrr(len(r), int(tied.sum())),
        "random_ndcg": float(r.mean()) * _dcg(np.ones(len(r))) / ideal if ideal > 0 else 1.0,
        "random_avg_reward": float(r.mean()), "random_exec_accuracy": float(e.mean()),
        "oracle_mrr": 1.0, "oracle_ndcg": 1.0, "oracle_accuracy": 1.0, "oracle_reward_ratio": 1.0, "oracle_avg_reward": float(best),
        "oracle_exec_accuracy": float(e.any()),
    }


def ranking_metrics(all_scores, all_rewards, all_exact=None) -> dict:
    """Means over questions of question_metrics (NaN for no questions)."""
    per = [question_metrics(s, r, None if all_exact is None else all_exact[i])
           for i, (s, r) in enumerate(zip(all_scores, all_rewards))]
    keys = [k for k in (per[0] if per else question_metrics([0.0], [0.0])) if k != "pick"]
    return {k: (float(np.mean([p[k] for p in per])) if per else math.nan) for k in keys} | {"questions": float(len(per))}


def table(metrics: dict) -> str:
    """model / random / oracle side by side, one metric a line."""
    lines = [f"{'metric':<14} {'model':>8} {'random':>8} {'oracle':>8}"]
    for name in NAMES:
        lines.append(f"{name:<14} {metrics[name]:>8.4f} {metrics['random_' + name]:>8.4f} "
                     f"{metrics['oracle_' + name]:>8.4f}" if f"random_{name}" in metrics else
                     f"{name:<14} {metrics[name]:>8.4f} {'':>8} {'':>8}")
    return "\n".join(lines)
