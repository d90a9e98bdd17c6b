"""Shared fixtures: the tiny model (built once per session) and the ../shared fixtures folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread in the test process: the models are tiny, and on a 2-core machine a second spinning
    thread only adds contention (steps 4-10x slower when anything else runs). Subprocesses are unaffected."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from app.lm.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_final_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """checkpoints/final of a 2-step full fine-tune of the tiny model (read-only: copy it before changing it)."""
    from app.train import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = tiny_config(tiny_model_dir, out, max_steps=2, batch_size=4, micro_batch_size=4, save_every=1000)
    assert train(cfg) == 0
    return out / "checkpoints" / "final"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir, tmp_path_factory):
    """The tiny model in float32 (eval mode) and its tokenizer as the engine loads it; one per test module."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.lm.modeling import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, load_tokenizer(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("g")))


@pytest.fixture(params=["mistral", "tiny"])
def tokenizer_and_cfg(request, tmp_path, tiny_model_dir):
    """(tokenizer, config) for the real Mistral tokenizer (skipped without the fixtures) and the tiny one."""
    from app.lm.modeling import load_tokenizer

    cfg = tiny_config(tiny_model_dir, tmp_path)
    if request.param == "mistral":
        cfg.tokenizer_name = str(request.getfixturevalue("mistral_tokenizer_dir"))
    return load_tokenizer(cfg), cfg


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (it ships beside the repo in CI, not in a user's clone)")
    return SHARED


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(shared_fixtures) -> Path:
    path = shared_fixtures / "tokenizer" / "mistral-7b-instruct-v0.2"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def run_app(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m app ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_args(model_dir: Path, out_dir: Path, **overrides) -> list[str]:
    """Overrides of configs/tiny.py for a short test run on the session's tiny model."""
    base = {
        "model_name": str(model_dir),
        "create_tiny_model": False,
        "out_dir": str(out_dir),
        "train_file": str(ROOT / "data/sample/train.csv"),
        "dev_file": None,
        "tensorboard": False,
        "log_every": 1,
        "warmup_steps": 2,
    }
    base.update(overrides)
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in base.items()]


def tiny_config(model_dir: Path, out_dir: Path, **overrides):
    from app.config import load_config

    return load_config(ROOT / "configs/tiny.py", tiny_args(model_dir, out_dir, **overrides))


def read_metrics(out_dir: Path) -> dict[int, dict]:
    """step -> merged values from metrics.jsonl."""
    import json

    merged: dict[int, dict] = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        merged.setdefault(entry.pop("step"), {}).update(entry)
    return merged


def losses(out_dir: Path) -> list[float]:
    """The logged training loss of every step, in step order."""
    return [v["loss"] for _, v in sorted(read_metrics(out_dir).items()) if "loss" in v]


def capture_model(monkeypatch) -> dict:
    """{"model": the model the engine trains}, captured when the NLI task builds its objective."""
    from app.tasks.nli_cot.task import NliCot

    captured, original = {}, NliCot.objective

    def spy(self, model, tokenizer, cfg):
        captured["model"] = model
        return original(self, model, tokenizer, cfg)

    monkeypatch.setattr(NliCot, "objective", spy)
    return captured
