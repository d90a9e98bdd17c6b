"""The command line: --help of every command, one-line usage errors, config overrides, no torch where none is
needed, the console script and its shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from app.cli import cli, main
from conftest import ROOT, run_app

SCRIPT = Path(sys.executable).parent / "finetune-runner"
KNOWN = {"train", "config", "tiny-model", "infer", "score", "sample-data", "verify", "tag", "score-steps", "steps",
         "steps convert", "steps synthetic"}


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the group, nested groups' commands included, as argument tuples."""
    ctx = click.Context(group)
    paths = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
    return paths


COMMANDS = command_paths()


def one_line(text: str) -> str:
    lines = text.strip("\n").splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_every_known_command_is_listed():
    assert KNOWN <= {" ".join(p) for p in COMMANDS}, COMMANDS


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_group_help(capsys, flag):
    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: python -m app [OPTIONS] COMMAND [ARGS]...")
    listed = out.split("Commands:", 1)[1]
    for path in COMMANDS:
        if len(path) == 1:
            assert f"\n  {path[0]} " in listed, path


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(capsys, path, flag):
    assert main([*path, flag]) == 0
    captured = capsys.readouterr()
    first = captured.out.splitlines()[0]
    assert first.startswith(f"Usage: python -m app {' '.join(path)} [OPTIONS]"), captured.out
    assert "-h, --help" in captured.out and captured.err == ""


def test_help_in_a_subprocess():
    proc = run_app("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: python -m app [OPTIONS] COMMAND [ARGS]...")
    assert "Commands:" in proc.stdout and "train" in proc.stdout


# --- errors ---------------------------------------------------------------------------------------------------------
def test_unknown_command_is_one_line_exit_2(capsys):
    assert main(["trian"]) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith("error: ") and "'trian'" in line and "train" in line
    assert captured.out == ""


@pytest.mark.parametrize("argv, command, missing", [
    (["train"], "train", "argument 'CONFIG.py'"),
    (["verify"], "verify", "argument 'PATH'"),
    (["sample-data", "nli_cot"], "sample-data", "argument 'DIRECTORY'"),
    (["steps", "convert", "in.jsonl"], "steps convert", "argument 'OUTPUT.jsonl'"),
    (["score", "--pred", "p.csv"], "score", "option '--gold'"),
])
def test_usage_error_is_one_line_exit_2(capsys, argv, command, missing):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith(f"error: Missing {missing}"), line
    assert line.endswith(f"(see python -m app {command} --help)"), line
    assert captured.out == ""


@pytest.mark.parametrize("arg, hint", [("lora_r=64", "usage: config CONFIG.py"),
                                       ("--lora_r", "config overrides take the form --name=value")])
def test_malformed_override_is_a_usage_error(capsys, arg, hint):
    assert main(["config", "configs/tiny.py", arg]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: unexpected argument {arg!r}; {hint}"), line


def test_no_command_prints_the_help_or_one_line(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: python -m app") or len(err.strip().splitlines()) == 1, err


# --- overrides --------------------------------------------------------------------------------------------------
def test_overrides_pass_through_to_the_config(capsys):
    assert main(["config", "configs/tiny.py"]) == 0
    plain = json.loads(capsys.readouterr().out)
    overrides = ["--lora_r=64", "--learning_rate=1e-4", "--target_modules=['q_proj']"]
    assert main(["config", "configs/tiny.py", *overrides]) == 0
    changed = json.loads(capsys.readouterr().out)
    assert plain["lora_r"] != 64 and changed["lora_r"] == 64
    assert changed["learning_rate"] == 1e-4 and changed["target_modules"] == ["q_proj"]
    assert {k for k in plain if plain[k] != changed[k]} == {"lora_r", "learning_rate", "target_modules"}


def test_unknown_override_names_the_closest_key(capsys):
    assert main(["config", "configs/tiny.py", "--lora_rr=64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'lora_rr'" in err and "did you mean 'lora_r'" in err


# --- what is imported ---------------------------------------------------------------------------------------------
def imports_torch(code: str) -> bool:
    proc = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint('torch' in sys.modules)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1] == "True"


def test_import_cli_and_config_do_not_import_torch():
    assert not imports_torch("import app.cli")
    assert not imports_torch("from app.cli import main\nassert main(['config', 'configs/tiny.py']) == 0")
    assert not imports_torch("from app.cli import main\nassert main(['score', '--help']) == 0")
    assert imports_torch("import torch")  # the probe itself works


def test_help_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "app", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stderr[-2000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "click" in modules  # the probe works
    assert "torch" not in modules


# --- the console script ---------------------------------------------------------------------------------------------
def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if not SCRIPT.is_file():
        pytest.skip(f"{SCRIPT} not installed (pip install -e .)")
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_console_script_help():
    proc = script("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ") and "Commands:" in proc.stdout and "score-steps" in proc.stdout


def test_console_script_usage_error_is_exit_2():
    proc = script("train")
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("error: Missing argument 'CONFIG.py'")


def test_console_script_bash_completion():
    proc = script(env={"_FINETUNE_RUNNER_COMPLETE": "bash_source"})
    assert proc.returncode == 0, proc.stderr[-500:]
    assert "complete " in proc.stdout and "finetune-runner" in proc.stdout, proc.stdout
    assert "_completion()" in proc.stdout
