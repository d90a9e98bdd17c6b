"""Config section of the NLI chain-of-thought task (torch-free: `python -m app config` imports it)."""

from __future__ import annotations

from pydantic import Field

from app.config.core import Section

# The fixed instruction comes first: a prefix common to every prompt is computed once per batch in training
# (share_prompt_prefix) and once per generation batch at inference.
DEFAULT_PROMPT = (
    "Does the premise entail the hypothesis? Think step by step, then answer with a JSON object "
    'holding "thought_process" and "predicted_label" (1 = entailed, 0 = not).\n'
    "Premise: {premise}\n"
    "Hypothesis: {hypothesis}\n"
    "Answer: "
)

# metric -> "max" | "min": what evaluation reports and metric_for_best may name
METRICS = {"macro_f1": "max", "accuracy": "max", "dev_loss": "min", "parse_failures": "min"}
DEFAULT_METRIC = "macro_f1"


class NliCotConfig(Section):
    """Task nli_cot: premise + hypothesis -> {"thought_process", "predicted_label"}"""

    prompt_template: str = Field(DEFAULT_PROMPT, description="prompt; {premise} and {hypothesis} are filled in")
