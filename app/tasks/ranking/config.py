"""Config section of the candidate-ranking task (torch-free: `python -m app config` imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from app.config.core import Section

METRICS = {"dev_loss": "min", "accuracy": "max", "reward_ratio": "max", "avg_reward": "max", "mrr": "max",
           "ndcg": "max", "exec_accuracy": "max"}
DEFAULT_METRIC = "accuracy"

CORRUPTIONS = ("numeric", "operation", "argument", "sign", "scale", "other_question", "unparseable")


class RankingConfig(Section):
    """Task ranking: a decoder backbone reads question + context + candidate; an MLP head scores each candidate"""

    rank_context: Literal["full", "gold"] = Field(
        "full", description="prepare: context of a question: full (pre_text, table rows, post_text) or gold facts only"
    )
    rank_bad_records: Literal["error", "skip"] = Field(
        "error", description="prepare: a bad FinQA record stops with its name (error) or is counted and left out (skip)"
    )
    num_candidates: int = Field(8, ge=2, description="candidates per question (the gold answer plus corruptions)")
    corruption_rate: float = Field(
        1.0, ge=0, le=1, description="share of the non-gold slots that are corruptions; the rest restate the gold answer"
    )
    corruption_mix: dict[str, float] = Field(
        {"numeric": 1.0, "operation": 1.0, "argument": 1.0, "sign": 0.5, "scale": 1.0, "other_question": 1.0,
         "unparseable": 0.5},
        description="corruption kind -> sampling weight (numeric, operation, argument, sign, scale, other_question, "
                    "unparseable)",
    )
    numeric_perturbation: float = Field(
        0.1, gt=0, description="largest relative change of a numeric perturbation (0.1 = up to 10%)"
    )
    candidate_text: Literal["program_answer", "answer"] = Field(
        "program_answer", description="what the model reads of a candidate: its program and answer, or the answer only"
    )
    reward_tiers: list[list[float]] = Field(
        [[0.01, 0.5], [0.05, 0.25], [0.2, 0.1]],
        description="partial credit: [relative error at most, reward] pairs (an exact match at 5 decimals is 1.0)",
    )
    rank_loss: Literal["ce", "multi_positive", "listnet"] = Field(
        "ce", description="ce: cross-entropy to the best candidate; multi_positive: to all tied best; listnet"
    )
    listnet_tau: float = Field(0.1, gt=0, description="temperature of ListNet's target softmax(reward / tau)")
    rank_head_hidden: int = Field(1024, gt=0, description="hidden width of the 2-layer MLP score head")
    rank_head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout after the score head's hidden layer")
    share_question_prefix: bool = Field(
        True, description="compute question + context once per question; the candidates attend to its keys/values"
    )
    candidate_chunk: int | None = Field(
        None, gt=0, description="candidate rows per suffix forward pass (bounds memory); None = all of a batch at once"
    )

    @field_validator("corruption_mix")
    @classmethod
    def _known_kinds(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(mix) - set(CORRUPTIONS))
        if unknown:
            raise ValueError(f"unknown corruption kind(s) {', '.join(unknown)}; known: {', '.join(CORRUPTIONS)}")
        if any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values()):
            raise ValueError("weights must be >= 0, at least one > 0")
        return mix

    @field_validator("reward_tiers")
    @classmethod
    def _tiers(cls, tiers: list[list[float]]) -> list[list[float]]:
        for t in tiers:
            if len(t) != 2 or t[0] < 0 or not 0 <= t[1] <= 1:
                raise ValueError(f"{t!r}: each tier is [max relative error >= 0, reward in [0, 1]]")
        return tiers
