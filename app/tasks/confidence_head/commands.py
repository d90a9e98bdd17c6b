"""Commands of the confidence-head task: `score-steps`, and `steps convert|synthetic` for step data files."""

from __future__ import annotations

import click

from app.cli import HELP, OVERRIDES, check_overrides, checkpoint_options, overrides_argument


@click.command("score-steps", context_settings=OVERRIDES)
@click.argument("input_file", metavar="INPUT")
@checkpoint_options("step_scores.jsonl", "scores JSONL")
@overrides_argument
def score_steps(input_file, checkpoint, output, fresh, overrides):
    """Per-step confidences of step-by-step solutions (generic step JSONL) from a confidence_head checkpoint."""
    from app.runs import run_command

    overrides = check_overrides(overrides, "score-steps INPUT [--checkpoint DIR] [--output FILE] [--key=value ...]")
    return run_command(input_file, checkpoint, output, overrides, fresh=fresh, examples=0, task_name="confidence_head")


@click.group(context_settings=HELP)
def steps():
    """Step-by-step data: convert PRM800K / REVEAL / eQASC / PRMBench files to the generic step JSONL, write the
    sample set."""


@steps.command(context_settings=HELP)
@click.argument("input_file", metavar="INPUT")
@click.argument("output", metavar="OUTPUT.jsonl")
@click.option("--format", "fmt", type=click.Choice(["auto", "generic", "prm800k", "reveal", "eqasc", "prmbench"]),
              default="auto", show_default=True, help="format of INPUT (auto: detected from its first record)")
def convert(input_file, output, fmt):
    """Write any supported step file as generic step JSONL ({"problem", "steps", "labels"} per line)."""
    from app.tasks.confidence_head import step_data

    rows = step_data.convert(input_file, output, fmt)
    click.echo(f"wrote {rows} examples to {output}")
    return 0


@steps.command(context_settings=HELP)
@click.argument("directory", type=click.Path(file_okay=False))
def synthetic(directory):
    """Write the bundled synthetic step set (data/sample/steps/) to DIRECTORY."""
    from app.tasks.confidence_head.step_data import write_synthetic

    for path in write_synthetic(directory):
        click.echo(f"wrote {path}")
    return 0



