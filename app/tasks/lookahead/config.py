"""Config section of the from-scratch lookahead task (torch-free: `python -m app config` imports it)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from app.config.core import ScratchModelSection

METRICS = {"dev_loss": "min", "perplexity": "min", "eval_lm_loss": "min", "confidence_mae": "min",
           "confidence_spearman": "max"}
DEFAULT_METRIC = "perplexity"


class LookaheadConfig(ScratchModelSection):
    """Task lookahead: a from-scratch MiniGPT or ConfidenceAwareGPT on a character-level public-domain corpus"""

    # the data is the corpus: train_file and dev_file name it (its head and its held-out tail)
    DERIVED: ClassVar[dict[str, str]] = {**ScratchModelSection.DERIVED, "train_file": "corpus_file",
                                         "dev_file": "corpus_file"}

    lookahead_model: Literal["plain", "confidence"] = Field(
        "confidence", description="which model a single run trains (the experiment runs both)"
    )
    lookahead_variant: Literal["fair", "seed"] = Field(
        "fair", description="fair: LM loss and lookahead at every position; seed: the seed's last-position step"
    )
    confidence_alpha: float = Field(1.0, ge=0, description="weight of the confidence MSE in the total loss")
    lookahead_steps: Literal[2] = Field(
        2, description="tokens ahead whose loss the confidence predicts (2: one step past the next token)"
    )
    confidence_trunk_grad: bool = Field(
        True, description="the confidence MSE trains the whole model (the seed's definition); False: the head only"
    )
    confidence_inputs: Literal["carried", "causal"] = Field(
        "carried", description="pass-1 confidence inputs: carried (the previous step's predictions, the seed's) or "
        "causal (position i gets the prediction made at i - 1 by a zero-confidence pass, as at evaluation)"
    )
    confidence_init_bias: float = Field(2.0, description="initial bias of the confidence_predictor's output")
    corpus_file: str = Field("data/lookahead/shakespeare.txt", min_length=1, description="ASCII training text")
    corpus_chars: int | None = Field(None, gt=0, description="use only the first N characters; None = all")
    corpus_dev_fraction: float = Field(0.05, gt=0, lt=1, description="held-out tail of the corpus (dev text)")
    experiment_seeds: list[int] = Field([42, 123, 456], min_length=1, description="seeds the experiment runs")
    experiment_models: list[Literal["plain", "confidence"]] = Field(
        ["plain", "confidence"], min_length=1, description="models the experiment runs, per seed"
    )
    experiment_results_dir: str = Field(
        "results/confidence_experiments", min_length=1, description="where the experiment writes results and plots"
    )
    calibration_points: int = Field(4000, gt=0, description="(predicted, actual) future-loss pairs kept per run")

    @classmethod
    def sequence_length(cls, context_length: int, data: dict) -> int:
        """A training window: the L inputs, the next token and the one after it (lookahead_steps = 2)."""
        return context_length + 2

    @classmethod
    def derived(cls, data: dict) -> dict:
        corpus = data.get("corpus_file", cls.model_fields["corpus_file"].default)
        files = {"train_file": corpus, "dev_file": corpus} if type(corpus) is str else {}
        return {**super().derived(data), **files}
