"""Commands of the NLI chain-of-thought task: `cot generate|reflect|combine|stats|judge`, training data made by
models behind an OpenAI-compatible API (app/tasks/nli_cot/datagen/)."""

from __future__ import annotations

import click

from app.cli import HELP, OVERRIDES, check_overrides, overrides_argument


@click.group(context_settings=HELP)
def cot():
    """Chain-of-thought training data through an OpenAI-compatible API: generate, reflect, combine, stats, judge."""


def _config(config_file, overrides, usage):
    from app.tasks.nli_cot.datagen.config import load_datagen_config

    return load_datagen_config(config_file, check_overrides(overrides, usage))


def _step(name: str, doc: str):
    @cot.command(name, context_settings=OVERRIDES, help=doc)
    @click.argument("input_file", metavar="INPUT")
    @click.option("--output", required=True, help="output table: .csv, or .jsonl/.json for JSON lines")
    @click.option("--config", "config_file", metavar="CFG.py", help="datagen config module (configs/cot_mistral.py)")
    @overrides_argument
    def command(input_file, output, config_file, overrides):
        from app.tasks.nli_cot.datagen import pipeline

        cfg = _config(config_file, overrides, f"cot {name} INPUT --output OUT [--config CFG.py] [--key=value ...]")
        try:
            getattr(pipeline, name)(input_file, output, cfg)
        except KeyboardInterrupt:
            click.echo("interrupted: the answers received are cached; re-run the same command to continue", err=True)
            return 130
        return 0

    return command


generate = _step("generate", "First pass: every premise/hypothesis row of INPUT -> thought_process and "
                             "predicted_label from `model` (the gold label is never shown), one row per input row.")
reflect = _step("reflect", "Rows of a generate output whose label is wrong (or failed): corrected reasoning from "
                           "`reflect_model`, given the gold label; optional consistency pass.")
judge = _step("judge", "LLM-as-a-judge scores (coherence, correctness, brevity, 1-5) of every row's thought_process.")


@cot.command(context_settings=OVERRIDES)
@click.argument("input_file", metavar="INPUT")
@click.option("--output", required=True, help="the training file (.csv or .jsonl): premise, hypothesis, label, "
              "thought_process, source, model, prompt_version")
@click.option("--config", "config_file", metavar="CFG.py", help="datagen config module (column names)")
@overrides_argument
def combine(input_file, output, config_file, overrides):
    """Training file from a reflect output: correct first-pass rows + reflected rows, every original row once."""
    from app.tasks.nli_cot.datagen import pipeline

    cfg = _config(config_file, overrides, "cot combine INPUT --output OUT [--config CFG.py] [--key=value ...]")
    pipeline.combine(input_file, output, cfg)
    return 0


@cot.command(context_settings=OVERRIDES)
@click.argument("input_file", metavar="INPUT")
@click.option("--output", required=True, help="stats JSON")
@click.option("--plot", metavar="PNG", help="histogram of thought lengths (default: OUTPUT with .png)")
@click.option("--config", "config_file", metavar="CFG.py", help="datagen config module (tokenizer, length_bands)")
@overrides_argument
def stats(input_file, output, plot, config_file, overrides):
    """Accuracy, reflection success, thought length in tokens, accuracy by length band, histogram PNG, cost."""
    from app.tasks.nli_cot.datagen.stats import run_stats

    cfg = _config(config_file, overrides, "cot stats INPUT --output STATS.json [--plot PNG] [--key=value ...]")
    run_stats(input_file, output, plot, cfg)
    return 0
