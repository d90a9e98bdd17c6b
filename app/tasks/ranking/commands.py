"""Commands of the ranking task: `ranking prepare|candidates|rewards` (the FinQA data pipeline) and `ranking rank`.

Each pipeline step reads one file and writes one (atomically), with a stats file beside it (`OUT.stats.json`) that
holds the fingerprint of its input and settings: re-running a finished step with the same input and settings does
nothing ("up to date"); anything else recomputes it. Settings come from `--config` (default configs/ranking.py) and
`--key=value` overrides (`--seed=7`, `--num_candidates=8`, `--rank_context='gold'`).
"""

from __future__ import annotations

import click

from app.cli import HELP, OVERRIDES, check_overrides, checkpoint_options, overrides_argument

_CONFIG = click.option("--config", "config_file", default="configs/ranking.py", show_default=True,
                       help="config module of the settings (seed, candidates, reward tiers)")
_FRESH = click.option("--fresh", is_flag=True, help="recompute even when the output is up to date")


@click.group(context_settings=HELP)
def ranking():
    """FinQA candidate ranking: prepare records, make candidate pools, give them rewards, rank with a checkpoint."""


@ranking.command(context_settings=OVERRIDES)
@click.argument("input_file", metavar="FINQA.json")
@click.argument("output", metavar="OUTPUT.jsonl")
@_CONFIG
@_FRESH
@overrides_argument
def prepare(input_file, output, config_file, fresh, overrides):
    """FinQA records -> one row per question (question, context, gold program and answer); checks the gold programs."""
    from app.tasks.ranking.pipeline import run_step

    overrides = check_overrides(overrides, "ranking prepare FINQA.json OUTPUT.jsonl [--key=value ...]")
    return run_step("prepare", input_file, output, config_file, overrides, fresh)


@ranking.command(context_settings=OVERRIDES)
@click.argument("input_file", metavar="PREPARED.jsonl")
@click.argument("output", metavar="OUTPUT.jsonl")
@_CONFIG
@_FRESH
@overrides_argument
def candidates(input_file, output, config_file, fresh, overrides):
    """Prepared rows -> the same rows with a shuffled pool of candidates each (gold + deterministic corruptions)."""
    from app.tasks.ranking.pipeline import run_step

    overrides = check_overrides(overrides, "ranking candidates PREPARED.jsonl OUTPUT.jsonl [--key=value ...]")
    return run_step("candidates", input_file, output, config_file, overrides, fresh)


@ranking.command(context_settings=OVERRIDES)
@click.argument("input_file", metavar="CANDIDATES.jsonl")
@click.argument("output", metavar="OUTPUT.jsonl")
@_CONFIG
@_FRESH
@overrides_argument
def rewards(input_file, output, config_file, fresh, overrides):
    """Candidate rows -> the same rows with a reward in [0, 1] and an exact-match flag per candidate."""
    from app.tasks.ranking.pipeline import run_step

    overrides = check_overrides(overrides, "ranking rewards CANDIDATES.jsonl OUTPUT.jsonl [--key=value ...]")
    return run_step("rewards", input_file, output, config_file, overrides, fresh)


@ranking.command(context_settings=OVERRIDES)
@click.argument("input_file", metavar="INPUT.jsonl")
@checkpoint_options("rankings.jsonl", "rankings JSONL")
@overrides_argument
def rank(input_file, checkpoint, output, fresh, overrides):
    """Pick the best candidate of every question with a ranking checkpoint (resumable after a kill)."""
    from app.runs import run_command

    overrides = check_overrides(overrides, "ranking rank INPUT.jsonl [--checkpoint DIR] [--output FILE] [--key=value]")
    return run_command(input_file, checkpoint, output, overrides, fresh=fresh, examples=0, task_name="ranking")
