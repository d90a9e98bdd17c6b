"""Commands of the confidence-token task: `tag` (training rows from raw QA data and a model)."""

from __future__ import annotations

import click

from app.cli import OVERRIDES, check_overrides, overrides_argument


@click.command(context_settings=OVERRIDES)
@click.argument("input_file", metavar="INPUT")
@click.option("--output", required=True, help="training JSONL to write")
@click.option("--dataset", help="dataset of every row (else the rows' dataset column)")
@click.option("--config", "config_file", help="config module (model, tokens, prompt, batch sizes)")
@click.option("--checkpoint", help="answer with this run checkpoint instead of the config's base model")
@click.option("--limit", type=int, help="only the first N rows")
@overrides_argument
def tag(input_file, output, dataset, config_file, checkpoint, limit, overrides):
    """Confidence-token training rows from raw QA rows (BoolQ / MedQA style) and a model."""
    from app.tasks.confidence_tokens.tag import run

    overrides = check_overrides(overrides, "tag INPUT --output OUT.jsonl [--config CFG.py] [--key=value ...]")
    return run(input_file, output, dataset, config_file, checkpoint, limit, overrides)



