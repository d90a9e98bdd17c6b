"""Settings of chain-of-thought data generation: a config module of plain assignments plus `--key=value` overrides.

    cfg = load_datagen_config("configs/cot_mistral.py", ["--concurrency=16"])

Every problem is reported at once, one per line: an unknown name with the closest valid one, a wrong type with the
key, the value and what was expected, each with the file:line (or "command line") that set it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from app.config.core import NonEmpty, Section
from app.errors import UserError

# USD per million tokens: model -> {"input": ..., "output": ...}
DEFAULT_PRICES = {
    "open-mistral-7b": {"input": 0.25, "output": 0.25},
    "open-mistral-nemo": {"input": 0.15, "output": 0.15},
}


class DatagenConfig(Section):
    """Chain-of-thought data generation (python -m app cot ...)"""

    base_url: NonEmpty = Field("https://api.mistral.ai/v1", description="OpenAI-compatible endpoint (.../v1)")
    api_key_env: NonEmpty = Field("MISTRAL_API_KEY", description="environment variable holding the API key "
                                  "(the key itself is never logged or written)")
    model: NonEmpty = Field("open-mistral-7b", description="model of the first pass (generate)")
    reflect_model: NonEmpty = Field("open-mistral-nemo", description="stronger model of the reflection pass")
    judge_model: NonEmpty | None = Field(None, description="model of `cot judge`; None = reflect_model")
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature")
    max_tokens: int = Field(400, gt=0, description="completion token budget per request")
    seed: int | None = Field(None, description="sampling seed sent to servers that take one")
    concurrency: int = Field(8, gt=0, description="requests in flight at once")
    rpm: int | None = Field(None, gt=0, description="requests per minute limit; None = none")
    tpm: int | None = Field(None, gt=0, description="tokens per minute limit (a request reserves its prompt estimate + "
                            "max_tokens, then counts the usage its reply reports); None = none")
    max_retries: int = Field(6, ge=0, description="retries of a request on 408/409/429/5xx, timeouts, bad bodies")
    backoff_base: float = Field(1.0, gt=0, description="first retry delay in seconds (doubles each retry, jittered)")
    backoff_max: float = Field(60.0, gt=0, description="cap of a retry delay in seconds (Retry-After too)")
    request_timeout: float = Field(120.0, gt=0, description="seconds to wait for one reply")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to wait for a connection")
    structured_output: Literal["auto", "on", "off"] = Field(
        "auto", description="send a response_format JSON schema: on, off (JSON asked for in the prompt only), or "
        "auto (on until the server refuses it, then off)")
    prompt_version: NonEmpty = Field("v1", description="the prompt set (app/tasks/nli_cot/datagen/prompts.py); part "
                                     "of every cache key and of each row's provenance")
    prompts: dict[str, dict[str, str]] = Field(
        {}, description="extra prompt sets: version -> {key: text} over the keys of the built-in v1 set")
    consistency_check: bool = Field(False, description="reflect: ask the reflection model, without the gold label, "
                                    "which label the corrected reasoning reaches; keep only reasoning that agrees")
    cache_file: NonEmpty | None = Field(None, description="raw-response cache (JSON lines); None = OUTPUT.cache.jsonl")
    prices: dict[str, dict[str, float]] = Field(
        DEFAULT_PRICES, description="USD per million tokens: model -> {'input': x, 'output': y}")
    premise_column: NonEmpty = Field("premise", description="input column of the premise")
    hypothesis_column: NonEmpty = Field("hypothesis", description="input column of the hypothesis")
    label_column: NonEmpty = Field("label", description="input column of the gold label (0/1); optional in generate")
    tokenizer: NonEmpty = Field("mistralai/Mistral-7B-v0.3", description="stats: tokenizer of the model to be "
                                "trained (hub name or directory)")
    length_bands: list[int] = Field([250, 400], description="stats: band edges of total (prompt + answer) tokens")
    progress: bool = Field(True, description="show a progress bar")

    def price(self, model: str) -> tuple[float, float]:
        p = self.prices.get(model) or {}
        return float(p.get("input", 0.0)), float(p.get("output", 0.0))


def _floats(value):
    """Integers are fine where floats are expected (prices of 1 USD, a timeout of 30)."""
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    return float(value) if type(value) is int else value


def validate_datagen(values, problems: list[str] | None = None) -> DatagenConfig:
    """Validate merged values (name -> (value, where)); every problem in one UserError."""
    from app.config import build_schema, unknown_key

    problems = list(problems or [])
    fields = DatagenConfig.model_fields
    for name, (_, where) in values.items():
        if name not in fields:
            problems.append(unknown_key(name, where, fields))
    known = {k: v for k, (v, _) in values.items() if k in fields}
    cfg = build_schema(DatagenConfig, known, values, problems,
                       coerce=lambda name, value: _floats(value) if name == "prices" else value)
    if cfg is not None:
        from app.tasks.nli_cot.datagen.prompts import PROMPTS

        if cfg.prompt_version not in PROMPTS and cfg.prompt_version not in cfg.prompts:
            where = values.get("prompt_version", (None, "config"))[1]
            problems.append(f"{where}: prompt_version={cfg.prompt_version!r}: unknown (known: {', '.join(PROMPTS)})")
        if sorted(cfg.length_bands) != cfg.length_bands or any(b <= 0 for b in cfg.length_bands):
            where = values.get("length_bands", (None, "config"))[1]
            problems.append(f"{where}: length_bands={cfg.length_bands!r}: must be increasing positive token counts")
    if problems:
        from app.config import join_problems

        raise UserError(join_problems(problems))
    return cfg


def load_datagen_config(path: str | Path | None, overrides=()) -> DatagenConfig:
    from app.config.modules import add_overrides, read_config_file

    values = read_config_file(Path(path)) if path is not None else {}
    problems: list[str] = []
    values = add_overrides(values, overrides, problems)
    return validate_datagen(values, problems)
