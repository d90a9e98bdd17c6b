"""The default install holds what the product's commands need, and a missing optional package is one line.

- Every third-party package that `app/` imports (at module level or inside a function) is declared in pyproject.toml:
  a default dependency, or an extra that only GPU-only / heavy pieces use (vllm, flash-attn, wandb); an extra's package
  is never imported at module level, so the commands that do not need it still run without it.
- In a subprocess whose environment lacks a package (hidden from imports and from `importlib.util.find_spec`, as in an
  environment where it was never installed), the command that needs it exits 2 with one `error:` line that names the
  `pip install` to run: the extra for an extra's package, the pinned requirement for a default dependency.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from conftest import ROOT, run_app, tiny_args

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution, for packages that are not installed in this environment (extras)
NOT_INSTALLED_DISTS = {"vllm": "vllm", "flash_attn": "flash-attn", "wandb": "wandb"}
# the commands' own modules never import the bench and dev tools
TOOL_EXTRAS = {"dev", "bench"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0))


def default_pins() -> dict[str, str]:
    return {requirement_name(r): r for r in PYPROJECT["dependencies"]}


def extra_dists() -> dict[str, str]:
    """distribution -> the extra that brings it (tool extras left out)."""
    return {requirement_name(r): extra for extra, reqs in PYPROJECT["optional-dependencies"].items()
            if extra not in TOOL_EXTRAS for r in reqs}


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for every absolute import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `try: import x` / `if TYPE_CHECKING:` at module level still run (or matter) at import
        if isinstance(node, (ast.Try, ast.If)):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in top_level))
    return found


def third_party_imports() -> dict[str, list[tuple[str, bool]]]:
    """import name -> [(file, module level)] over app/, stdlib and app itself left out."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        for name, module_level in imports_of(path):
            if name in sys.stdlib_module_names or name in ("app", "__future__"):
                continue
            out.setdefault(name, []).append((str(path.relative_to(ROOT)), module_level))
    return out


def distribution_of(import_name: str) -> str:
    dists = metadata.packages_distributions().get(import_name)
    if dists:
        return canonical(dists[0])
    if import_name in NOT_INSTALLED_DISTS:
        return NOT_INSTALLED_DISTS[import_name]
    pytest.fail(f"app imports {import_name!r}, which is not installed and not a known extra's package")


def test_every_package_the_app_imports_is_declared():
    defaults, extras = default_pins(), extra_dists()
    undeclared = []
    for name, places in third_party_imports().items():
        dist = distribution_of(name)
        if dist in defaults:
            continue
        if dist not in extras:
            undeclared.append(f"{name} ({dist}) imported in {places[0][0]} is not declared in pyproject.toml")
            continue
        eager = [f for f, module_level in places if module_level]
        assert not eager, f"{name} comes with the '{extras[dist]}' extra but {eager} import it at module level"
    assert not undeclared, "\n".join(undeclared)


def test_the_readme_packages_are_default_dependencies():
    """What the README's commands use (the CLI, Parquet data, QLoRA, plots, cot, demo) installs by default."""
    assert {"click", "datasets", "bitsandbytes", "matplotlib", "openai", "fastapi", "uvicorn"} <= set(default_pins())
    assert set(extra_dists()) >= {"vllm", "flash-attn", "wandb"}


# --- a command in an environment without the package ----------------------------------------------------------------
HIDE = """
import importlib.abc, importlib.util, runpy, sys
HIDDEN = set(sys.argv.pop(1).split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in HIDDEN else _find_spec(name, package)
if sys.argv[1].endswith(".py"):  # a script (a benchmark), else `python -m app ARGS`
    sys.argv.pop(0)
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


def run_without(modules: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m app ARGS` (or `python SCRIPT.py ARGS`) with `modules` missing from the environment."""
    return subprocess.run([sys.executable, "-c", HIDE, ",".join(modules), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def expected_hint(dist: str) -> str:
    """An extra's package: the extra (a tool extra from the checkout); a default dependency: its pinned requirement."""
    extras = extra_dists()
    if dist in extras:
        return f"pip install 'finetune-runner[{extras[dist]}]'"
    tools = {requirement_name(r): e for e in TOOL_EXTRAS for r in PYPROJECT["optional-dependencies"][e]}
    if dist in tools:
        return f"pip install -e '.[{tools[dist]}]'"
    return f"pip install '{default_pins()[dist]}'"


def assert_one_line_install_error(proc: subprocess.CompletedProcess, needed_for: str, dist: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and needed_for in last and expected_hint(dist) in last, last


@pytest.fixture()
def parquet_train(tmp_path) -> Path:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")  # never read: the reader is refused before it opens the file
    return path


TRAIN_CASES = [
    # (hidden modules, overrides, what needs it, distribution)
    (["wandb"], {"wandb": True}, "wandb=True", "wandb"),
    (["flash_attn"], {"attn_implementation": "flash_attention_2"}, "attn_implementation='flash_attention_2'",
     "flash-attn"),
    (["bitsandbytes"], {"optimizer": "adamw_8bit"}, "optimizer='adamw_8bit'", "bitsandbytes"),
    (["bitsandbytes"], {"quantization": "4bit", "finetuning": "lora"}, "quantization='4bit'", "bitsandbytes"),
]


@pytest.mark.slow
@pytest.mark.parametrize("hidden,overrides,needed_for,dist", TRAIN_CASES, ids=[c[3] + ":" + c[2] for c in TRAIN_CASES])
def test_train_without_an_optional_package_is_one_line(tmp_path, tiny_model_dir, hidden, overrides, needed_for, dist):
    out = tmp_path / "run"
    proc = run_without(hidden, "train", str(ROOT / "configs/tiny.py"),
                       *tiny_args(tiny_model_dir, out, max_steps=1, **overrides), cwd=tmp_path)
    assert_one_line_install_error(proc, needed_for, dist)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_parquet_data_without_datasets_is_one_line(tmp_path, tiny_model_dir, parquet_train):
    proc = run_without(["datasets"], "train", str(ROOT / "configs/tiny.py"),
                       *tiny_args(tiny_model_dir, tmp_path / "run", max_steps=1, train_file=str(parquet_train)),
                       cwd=tmp_path)
    assert_one_line_install_error(proc, "reading Parquet", "datasets")


def test_vllm_backend_without_vllm_is_one_line(tmp_path, tiny_final_checkpoint):
    out = tmp_path / "predictions.csv"
    proc = run_without(["vllm"], "infer", str(ROOT / "data/sample/test.csv"), "--checkpoint",
                       str(tiny_final_checkpoint), "--output", str(out), "--backend=vllm", cwd=tmp_path)
    assert_one_line_install_error(proc, "backend='vllm'", "vllm")
    assert "--backend=hf" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_same_command_runs_when_the_package_is_there(tmp_path, tiny_model_dir):
    """The hiding itself is what fails the cases above: with nothing hidden, the optimizer case trains."""
    proc = run_without(["nothing_hidden"], "train", str(ROOT / "configs/tiny.py"),
                       *tiny_args(tiny_model_dir, tmp_path / "run", max_steps=1, optimizer="adamw_8bit"),
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels-community" not in proc.stderr  # bitsandbytes' note about a Hub kernel (AVX512-BF16 CPUs)


@pytest.mark.slow
def test_the_main_command_leaves_training_curves(tmp_path, tiny_model_dir):
    """`./run_training.sh configs/tiny.py` in local mode (the README's first command, shortened) draws the curves:
    matplotlib is in the environment that command builds."""
    out = tmp_path / "run"
    proc = subprocess.run([str(ROOT / "run_training.sh"), "configs/tiny.py", "--mode", "local",
                           *tiny_args(tiny_model_dir, out, max_steps=4)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no training curves" not in proc.stderr
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_bench_without_trl_is_one_line(tmp_path):
    """The benchmark's SFTTrainer reference needs the bench extra; without it the script says so (exit 1, a script)."""
    proc = run_without(["trl"], str(ROOT / "tests/bench/train_throughput.py"), "--setups", "engine,trl", cwd=tmp_path)
    assert_one_line_install_error(proc, "the trl setups", "trl", code=1)
