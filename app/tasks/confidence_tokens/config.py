"""Config section of the confidence-token task (torch-free: `python -m app config` imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.config.core import Section

METRICS = {"token_accuracy": "max", "calibration_error": "min", "dev_loss": "min", "answer_accuracy": "max",
           "token_nll": "min", "ece": "min", "brier": "min"}
DEFAULT_METRIC = "token_accuracy"


class ConfidenceTokensConfig(Section):
    """Task confidence_tokens: answer, then a <C_...>/<U_...> token saying whether the answer is right"""

    confidence_tokens: dict[str, list[str]] = Field(
        {"boolq": ["<C_READ>", "<U_READ>"], "medqa": ["<C_MED>", "<U_MED>"]},
        description="dataset -> [confident token, unconfident token], added as special tokens",
    )
    confidence_loss: Literal["full_vocab", "pair"] = Field(
        "full_vocab", description="cross-entropy over the full vocabulary or the domain's two tokens"
    )
    validation_files: dict[str, str] = Field(
        {}, description="dataset -> raw QA file for validation; empty = dev_file (dataset column)"
    )
    confidence_prompt: str = Field(
        "{question}\nAnswer:", description="prompt around the question text ({question})"
    )
    confidence_chat_template: bool = Field(
        False, description="put the question in the tokenizer's chat template (instruct models)"
    )
    calib_beta: int | None = Field(
        50, gt=0, description="equal-mass calibration bins of this many samples (Kumar et al.); None = reference binning"
    )
    n_bins: int = Field(10, gt=0, description="equal-width bins of the ECE and the reliability diagram")
    calibration_metric: Literal[
        "ce_l2_debiased", "ce_l2_plugin", "ce_l1_plugin", "ce_max_plugin", "ece_l1", "ece_l2", "ece_max", "brier"
    ] = Field("ce_l2_debiased", description="the calibration_error that picks best_calibration/")
    hub_repo: str | None = Field(
        None, description="push final/ adapter + tokenizer to this Hub repo (HF_TOKEN from env)"
    )
