"""Rewards of candidates against the gold answer, in [0, 1].

  1.0                      exact FinQA execution match (equal at 5 decimals; the same yes/no)
  tier reward              the first `reward_tiers` pair [max relative error, reward] the candidate's relative error
                           |a - g| / max(|g|, 1e-9) is within (tiers are tried in order of error)
  0.0                      anything else: a wrong yes/no, an unparseable candidate (no answer), a number beyond the tiers

`exact` (the execution-accuracy flag) is kept apart from the tolerant reward.
"""

from __future__ import annotations

import math

from app.tasks.ranking.finqa import same_answer


def reward(answer, gold, tiers) -> float:
    if answer is None or gold is None:
        return 0.0
    if same_answer(answer, gold):
        return 1.0
    if isinstance(answer, str) or isinstance(gold, str):
        return 0.0
    a, g = float(answer), float(gold)
    if not (math.isfinite(a) and math.isfinite(g)):
        return 0.0
    rel = abs(a - g) / max(abs(g), 1e-9)
    for limit, value in sorted(tuple(t) for t in tiers):
        if rel <= limit:
            return float(value)
    return 0.0


def add_rewards(rows: list[dict], cfg) -> list[dict]:
    out = []
    for row in rows:
        gold = row["gold_answer"]
        rewards = [reward(c.get("answer"), gold, cfg.reward_tiers) for c in row["candidates"]]
        exact = [same_answer(c.get("answer"), gold) for c in row["candidates"]]
        out.append({**row, "rewards": rewards, "exact": exact})
    return out
