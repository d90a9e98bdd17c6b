"""Config section of the per-step confidence-head task (torch-free: `python -m app config` imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.config.core import Section

METRICS = {"dev_loss": "min", "mse": "min", "mae": "min", "pearson": "max", "spearman": "max", "auroc": "max",
           "ece": "min"}
DEFAULT_METRIC = "dev_loss"


class ConfidenceHeadConfig(Section):
    """Task confidence_head: an MLP head reads the hidden state at a marker after each reasoning step"""

    step_marker: str = Field(
        "<CONFIDENCE>", description="special token after each step; the head reads its hidden state"
    )
    step_train_files: dict[str, float] = Field(
        {}, description="training files -> sampling weight (weighted mix); empty = train_file alone"
    )
    step_dev_files: list[str] = Field([], description="dev files, concatenated; empty = dev_file")
    step_formats: dict[str, Literal["auto", "generic", "prm800k", "reveal", "eqasc", "prmbench"]] = Field(
        {}, description="file -> data format; unlisted files are detected from their first record"
    )
    step_mix_size: int | None = Field(
        None, gt=0, description="rows drawn from the weighted mix; None = all files' rows together"
    )
    head_hidden_sizes: list[int] = Field(
        [1024, 256], description="hidden widths of the MLP head (Linear + GELU + Dropout each)"
    )
    head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout after each hidden layer of the head")
    head_loss: Literal["mse", "huber"] = Field("mse", description="regression loss on labelled steps")
    head_huber_delta: float = Field(1.0, gt=0, description="delta of the Huber loss (head_loss='huber')")
