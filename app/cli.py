"""The command line: one click group for `python -m app` and the `finetune-runner` console script.

Core commands live here; each task adds its own (app/tasks/<name>/commands.py, registered in app/tasks). Every
command imports its work only when it runs, so `--help` and `score` never import torch. Any `--key=value` a command
does not know is a config override and passes through unchanged. Errors: a `UserError` is one line on stderr
(`error: ...`), exit code 2; usage errors exit 2 too.

Shell completion (bash; zsh and fish likewise with zsh_source / fish_source):
    eval "$(_FINETUNE_RUNNER_COMPLETE=bash_source finetune-runner)"
"""

from __future__ import annotations

import logging
import sys

import click

from app.errors import UserError

# every command answers -h as well as --help (set per command: click caches a command's help option)
HELP = {"help_option_names": ["-h", "--help"]}
# unknown options are kept as arguments: they are the `--key=value` config overrides
OVERRIDES = {"ignore_unknown_options": True, "allow_extra_args": False, **HELP}


def overrides_argument(f):
    return click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[--key=value]...")(f)


def checkpoint_options(default_output: str | None, what: str):
    """--checkpoint, --output and --fresh: the options of every command that runs a checkpoint over an input file."""
    def apply(f):
        f = click.option("--fresh", is_flag=True, help="ignore a partial file from an interrupted run")(f)
        f = click.option("--output", default=default_output, show_default=default_output is not None, help=what)(f)
        return click.option("--checkpoint", help="checkpoint or run directory (default: the newest run under "
                            "checkpoints/)")(f)
    return apply


def check_overrides(overrides: tuple[str, ...], usage: str) -> list[str]:
    """The overrides as a list; anything that is not `--name=value` is a usage error naming it."""
    for arg in overrides:
        if not (arg.startswith("--") and "=" in arg):
            hint = "config overrides take the form --name=value" if arg.startswith("--") else f"usage: {usage}"
            raise click.UsageError(f"unexpected argument {arg!r}; {hint}")
    return list(overrides)


class LazyGroup(click.Group):
    """A group whose commands from other modules (`verify`, the tasks' commands) are imported only when they are
    run or listed, so that `score` never imports what another command needs (torch)."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})  # name -> "module:attribute"

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name not in self.commands and name in self.lazy:
            import importlib

            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


def _lazy_commands() -> dict[str, str]:
    from app.tasks import task_command_paths

    return {"verify": "app.engine.verify:verify_command", "report": "app.report.command:report",
            "pipeline": "app.pipelines.command:pipeline", **task_command_paths()}


@click.group(cls=LazyGroup, lazy=_lazy_commands(),
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
def cli():
    """finetune-runner: fine-tune LLMs, train small models, run batched inference, from Python config modules."""


@cli.command(context_settings=OVERRIDES)
@click.argument("config_file", metavar="CONFIG.py", type=click.Path(dir_okay=False))
@overrides_argument
def train(config_file, overrides):
    """Train a model from a config module, or resume its run (re-run the same command after a stop)."""
    from app.config import load_config
    from app.train import train as run_training

    cfg = load_config(config_file, check_overrides(overrides, "train CONFIG.py [--key=value ...]"))
    return run_training(cfg)


@cli.command("config", context_settings=OVERRIDES)
@click.argument("config_file", metavar="[CONFIG.py]", required=False)
@click.option("--list", "list_fields", is_flag=True, help="print every field by section, with default and meaning")
@click.option("--task", help="with --list: only the core sections and this task's section")
@overrides_argument
def config_command(config_file, list_fields, task, overrides):
    """Print the resolved, validated config of CONFIG.py (with overrides) as JSON, or list every field."""
    from app.config import describe_fields, load_config

    if list_fields:
        if task is not None:
            from app.tasks import check_task_name

            check_task_name(task)
        click.echo(describe_fields(task))
        return 0
    if config_file is None:
        raise click.UsageError("give CONFIG.py, or --list")
    cfg = load_config(config_file, check_overrides(overrides, "config CONFIG.py [--key=value ...]"))
    click.echo(cfg.to_json())
    return 0


@cli.command("tiny-model", context_settings=HELP)
@click.argument("directory", type=click.Path(file_okay=False))
def tiny_model(directory):
    """Write the embedded tiny model and tokenizer (random weights, no download) to DIRECTORY."""
    from pathlib import Path

    from app.runs import check_new_folder

    check_new_folder(Path(directory), directory)
    if Path(directory).exists():
        raise UserError(f"{directory}: already exists; give a new directory")
    from app.lm.tiny import write_tiny_model

    click.echo(f"wrote tiny model and tokenizer to {write_tiny_model(directory)}")
    return 0


@cli.command(context_settings=OVERRIDES)
@click.argument("input_file", metavar="INPUT", type=click.Path(dir_okay=True))
@checkpoint_options(None, "the main output file (default: the task's, e.g. predictions.csv)")
@click.option("--examples", type=int, default=5, show_default=True, help="example rows to print at the end")
@overrides_argument
def infer(input_file, checkpoint, output, fresh, examples, overrides):
    """Batched inference of a checkpoint on INPUT (CSV or JSONL): what the checkpoint's task predicts."""
    from app.infer import run_cli

    overrides = check_overrides(overrides, "infer INPUT [--checkpoint DIR] [--output FILE] [--key=value ...]")
    return run_cli(input_file, checkpoint, output, overrides, fresh=fresh, examples=examples)


@cli.command(context_settings=HELP)
@click.option("--pred", required=True, help="predictions CSV (predicted_label column) or one 0/1 per line")
@click.option("--gold", required=True, help="gold CSV/JSONL (label column) or one 0/1 per line")
@click.option("--json", "json_out", metavar="OUT", help="also write the metrics JSON to OUT")
@click.option("--n_bins", type=int, default=10, show_default=True, help="equal-width bins of the ECE (confidence column)")
@click.option("--calib_beta", type=int, default=None,
              help="equal-mass calibration bins of this many samples (default: the reference binning)")
def score(pred, gold, json_out, n_bins, calib_beta):
    """Score predictions against gold labels: accuracy, macro/weighted precision, recall, F1, MCC (no torch)."""
    from app.score import run

    return run(pred, gold, json_out, n_bins, calib_beta)


@cli.command("sample-data", context_settings=HELP)
@click.argument("task")
@click.argument("directory", type=click.Path(file_okay=False))
def sample_data(task, directory):
    """Write a task's bundled sample data set to DIRECTORY (deterministic)."""
    from pathlib import Path

    from app.runs import check_new_folder
    from app.tasks import check_task_name, write_sample

    check_task_name(task)
    check_new_folder(Path(directory), directory)
    for path in write_sample(task, directory):
        click.echo(f"wrote {path}")
    return 0


@cli.command(context_settings=OVERRIDES)
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--output", required=True, help="new directory to write the exported model or adapter to")
@click.option("--merge", is_flag=True, help="merge an adapter into its base (a 4-bit base is reloaded in 16-bit)")
@overrides_argument
def export(checkpoint, output, merge, overrides):
    """Export a checkpoint for serving (merged model or clean adapter) and print vllm/transformers serve commands."""
    from app.export import export as run_export

    run_export(checkpoint, output, merge, check_overrides(overrides, "export CHECKPOINT --output DIR [--merge]"),
               echo=click.echo)
    return 0


@cli.command(context_settings=OVERRIDES)
@click.option("--checkpoint", help="NLI checkpoint or run directory (default: the newest run under checkpoints/)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=7860, show_default=True, help="port to listen on")
@overrides_argument
def demo(checkpoint, host, port, overrides):
    """Serve a demo page for an nli_cot, confidence_tokens or confidence_head checkpoint: a form and a file upload."""
    from app.demo.app import serve

    return serve(checkpoint, host, port, check_overrides(overrides, "demo [--checkpoint DIR] [--key=value ...]"))


@cli.group(invoke_without_command=True, context_settings=HELP)
@click.option("--for", "config_file", metavar="CONFIG.py", type=click.Path(dir_okay=False),
              help="fetch everything the config names on the Hub: base model, tokenizer, hf: data")
@click.pass_context
def download(ctx, config_file):
    """Prefetch models and data into the Hugging Face cache, for nodes without internet (then HF_HUB_OFFLINE=1)."""
    if ctx.invoked_subcommand is not None:
        return None
    if config_file is None:
        raise click.UsageError("give a subcommand (model NAME, data ID) or --for CONFIG.py")
    from app.download import download_for

    download_for(config_file)
    return 0


@download.command("model", context_settings=HELP)
@click.argument("name")
@click.option("--revision", help="branch, tag or commit (default: main)")
def download_model(name, revision):
    """Fetch a model repository (safetensors, config, tokenizer; no .bin weights)."""
    from app.download import download_model as fetch

    fetch(name, revision)
    return 0


@download.command("data", context_settings=HELP)
@click.argument("source", metavar="ID")
@click.option("--split", help="only the files of this split")
@click.option("--revision", help="branch, tag or commit (default: main)")
def download_data(source, split, revision):
    """Fetch a Hub dataset (OWNER/NAME or hf:OWNER/NAME[:CONFIG][:SPLIT])."""
    from app.download import download_data as fetch

    fetch(source, split, revision)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns its exit code (UserError: one line on stderr, 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from pathlib import Path

    # bitsandbytes, on CPUs with AVX512-BF16, warns at import that it could not fetch an optional kernel from the
    # Hub (the `kernels` package): the runner never downloads code, and the 4-bit path works without it
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    prog = "finetune-runner" if Path(sys.argv[0]).name == "finetune-runner" else "python -m app"
    try:
        result = cli.main(args=argv, prog_name=prog, complete_var="_FINETUNE_RUNNER_COMPLETE", standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.NoArgsIsHelpError as err:  # a bare group: its help, as `--help` would print it
        print(err.format_message(), file=sys.stderr)
        return err.exit_code
    except click.UsageError as err:  # one line too, with where to look
        where = f"{err.ctx.command_path} --help" if err.ctx is not None else "python -m app --help"
        print(f"error: {err.format_message()} (see {where})", file=sys.stderr)
        return err.exit_code
    except click.ClickException as err:
        print(f"error: {err.format_message()}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.Exit as err:  # --help
        return err.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    return int(result or 0)
