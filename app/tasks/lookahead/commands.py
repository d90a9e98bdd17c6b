"""Commands of the lookahead task: `experiment` (train both models over seeds, results, plots) and `plot`."""

from __future__ import annotations

import click

from app.cli import HELP, OVERRIDES, check_overrides, overrides_argument


@click.command("experiment", context_settings=OVERRIDES)
@click.argument("config_file", metavar="CONFIG.py", type=click.Path(dir_okay=False))
@click.option("--results-dir", help="where results and plots go (default: the config's experiment_results_dir)")
@overrides_argument
def experiment(config_file, results_dir, overrides):
    """MiniGPT vs ConfidenceAwareGPT over seeds (each an engine run, resumable), then results JSON, plots, summary."""
    from app.tasks.lookahead.experiment import run_experiment

    overrides = check_overrides(overrides, "experiment CONFIG.py [--results-dir DIR] [--key=value ...]")
    result = run_experiment(config_file, overrides, results_dir)
    return result if isinstance(result, int) else 0  # a stopped run's exit code (re-run to continue)


@click.command("plot", context_settings=HELP)
@click.argument("results_file", metavar="RESULTS.json", type=click.Path(dir_okay=False))
def plot(results_file):
    """Redraw the lookahead experiment's plots and summary table from its results JSON."""
    from pathlib import Path

    from app.tasks.lookahead.experiment import load_results, summary_table, write_plots

    results = load_results(results_file)  # checked whole first: a bad file leaves no plot behind
    table = summary_table(results)
    stem = Path(results_file).name.removesuffix("_results.json").removesuffix(".json")
    paths = write_plots(results, Path(results_file).parent / stem)
    click.echo(table)
    for p in paths:
        click.echo(f"plot: {p}")
    return 0
