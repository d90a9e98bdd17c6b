"""The `pipeline` command (app/pipelines/steps.py runs the steps)."""

from __future__ import annotations

from pathlib import Path

import click

from app.cli import HELP
from app.pipelines import PIPELINES, SCALES


@click.command("pipeline", context_settings=HELP)
@click.argument("name", type=click.Choice(list(PIPELINES)))
@click.option("--scale", type=click.Choice(SCALES), default="tiny", show_default=True,
              help="tiny: the embedded tiny model on bundled or fixture data, CPU, minutes; full: the real models "
                   "and data, a GPU")
@click.option("--workdir", type=click.Path(file_okay=False), help="where every output goes "
              "(default: checkpoints/pipelines/NAME_SCALE)")
@click.option("--data", type=click.Path(), help="the pipeline's main input in place of its default")
@click.option("--dry-run", is_flag=True, help="print every step with its state, command and expected time; run none")
def pipeline(name, scale, workdir, data, dry_run):
    """Run an experiment end to end, skipping steps whose output is up to date; ends with a report.

    \b
    nli_cot            cot generate (server), reflect, combine, train, infer test, score dev
    confidence_tokens  tag, train, calibration
    confidence_head    steps convert, train, score-steps
    ranking            ranking prepare, candidates, rewards, train, rank
    lookahead          the seeds experiment
    """
    from app.pipelines import build
    from app.pipelines.steps import dry_run as show, run_pipeline

    plan = build(name, scale, Path(workdir) if workdir else None, Path(data) if data else None)
    if dry_run:
        show(plan, click.echo)
        return 0
    try:
        run_pipeline(plan, click.echo)
    except KeyboardInterrupt:
        click.echo("interrupted: finished steps are kept; re-run the same command to continue", err=True)
        return 130
    click.echo(f"report: {plan.work / 'report.md'} and {plan.work / 'report.html'}")
    return 0
