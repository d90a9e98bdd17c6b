"""The `report` command (app/report/build.py does the work)."""

from __future__ import annotations

import click

from app.cli import HELP


@click.command("report", context_settings=HELP)
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True)
@click.option("--output", metavar="REPORT.md", help="Markdown page to write; the HTML page and a folder of figures go "
              "beside it (default: RUN_DIR/report.md for one run, ./report.md for several)")
@click.option("--attach", metavar="[TITLE=]FILE.json", multiple=True,
              help="a JSON result of the same experiment (scores, data statistics) shown as a table; repeatable")
def report(run_dirs, output, attach):
    """One page on a run (environment, config, data, time, curves, metrics, calibration, warnings), or the
    comparison of several runs: what they changed and which won. Markdown + HTML."""
    from app.report.build import write_report

    written = write_report(list(run_dirs), output, attach)
    click.echo(f"wrote {written['markdown']} and {written['html']} ({len(written['figures'])} figures)")
    return 0
