"""Exact resume: SIGKILL, SIGTERM and a failed checkpoint write all continue to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from app import checkpoint as ckpt
from app.train import train
from conftest import ROOT, read_metrics, tiny_args, tiny_config

# LoRA with dropout, so the RNG state matters as much as the weights, optimizer and data position
RUN = dict(finetuning="lora", lora_dropout=0.2, learning_rate=1e-2, max_steps=24, batch_size=8, micro_batch_size=4,
           save_every=3, keep_last=2, warmup_steps=5, lr_scheduler="cosine")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(tiny_config(tiny_model_dir, out, **RUN)) == 0
    return out


def start(tiny_model_dir, out):
    cmd = [sys.executable, "-m", "app", "train", "configs/tiny.py", *tiny_args(tiny_model_dir, out, **RUN)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


# hang guards, not speed checks: these tests took 43-103 s at a load average of 14 on 2 cores
WAIT_TIMEOUT = 600


def wait_for(predicate, proc, timeout=WAIT_TIMEOUT):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def steps_logged(out) -> int:
    """The last step in metrics.jsonl, read while the run writes it (complete lines only)."""
    text = (out / "metrics.jsonl").read_text()
    return max(json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines())


def assert_same_run(out, reference):
    """The same computation, interrupted and resumed: the losses measured bitwise equal on AVX-512 and AVX2 kernels,
    so 1e-6 is no margin fitted to one machine."""
    final = load_file(str(out / "checkpoints/final/adapter_model.safetensors"))
    expected = load_file(str(reference / "checkpoints/final/adapter_model.safetensors"))
    assert set(final) == set(expected)
    diff = max((final[k] - expected[k]).abs().max().item() for k in final)
    assert diff <= 1e-6, diff
    got, want = read_metrics(out), read_metrics(reference)
    assert sorted(got) == sorted(want) == list(range(1, RUN["max_steps"] + 1))
    assert [got[s]["lr"] for s in sorted(got)] == [want[s]["lr"] for s in sorted(want)]  # no second warmup
    assert [got[s]["loss"] for s in sorted(got)] == pytest.approx([want[s]["loss"] for s in sorted(want)], abs=1e-6)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tiny_model_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(tiny_model_dir, out)
    wait_for(lambda: (out / "checkpoints" / ckpt.step_name(9)).is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints/final").exists()
    resumed_from = ckpt.read_json(ckpt.latest(out) / "trainer_state.json")
    assert 9 <= resumed_from["step"] < RUN["max_steps"]
    proc = start(tiny_model_dir, out)
    stdout, stderr = proc.communicate(timeout=WAIT_TIMEOUT)
    assert proc.returncode == 0, stderr
    assert f"resumed from {ckpt.latest(out).parent / ckpt.step_name(resumed_from['step'])}" in stderr or \
        "resumed from" in stderr
    assert_same_run(out, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_in_progress_and_exits_143(tiny_model_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(tiny_model_dir, out)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and "\n" in (out / "metrics.jsonl").read_text(), proc)
    done_before = steps_logged(out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=WAIT_TIMEOUT)
    assert proc.returncode == 143, stderr
    latest = ckpt.latest(out)
    assert latest is not None and latest.name.startswith("step_")
    stopped_at = ckpt.read_json(latest / "trainer_state.json")["step"]
    assert max(read_metrics(out)) == stopped_at  # the checkpoint holds the last step done
    # fast: the step in progress, not the next save_every boundary or the end of the run (counted in steps, not
    # seconds; one more if a step ended between reading the metrics and the signal)
    assert done_before <= stopped_at <= done_before + 2 < RUN["max_steps"], (done_before, stopped_at)
    assert "re-run the same command to resume" in stderr
    proc = start(tiny_model_dir, out)
    _, stderr = proc.communicate(timeout=WAIT_TIMEOUT)
    assert proc.returncode == 0, stderr
    assert_same_run(out, reference)


def test_failed_checkpoint_write_leaves_previous_usable(tiny_model_dir, tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    assert train(tiny_config(tiny_model_dir, out, **RUN, stop_after_steps=6)) == 0
    assert ckpt.latest(out).name == ckpt.step_name(6)

    def dies_midway(*args, **kwargs):  # as if the process were killed while writing the checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_scheduler", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model_dir, out, **RUN))
    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    assert ".tmp-" + ckpt.step_name(9) in leftovers  # the half-written one never got a real name
    assert ckpt.latest(out).name == ckpt.step_name(6)
    monkeypatch.undo()
    assert train(tiny_config(tiny_model_dir, out, **RUN)) == 0
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
    assert_same_run(out, reference)


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ckpt.save_optimizer(opt, tmp_path)
    other = torch.optim.AdamW(model.parameters(), lr=0.5)
    ckpt.load_optimizer(other, tmp_path)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 0.1
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][key])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))


def test_8bit_optimizer_state_resumes_exactly(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = dict(RUN, optimizer="adamw_8bit", max_steps=6, lora_dropout=0.0)
    assert train(tiny_config(tiny_model_dir, tmp_path / "whole", **run)) == 0
    split = tmp_path / "split"
    assert train(tiny_config(tiny_model_dir, split, **run, stop_after_steps=3)) == 0
    assert ckpt.latest(split).name == ckpt.step_name(3)
    assert train(tiny_config(tiny_model_dir, split, **run)) == 0
    a = load_file(str(tmp_path / "whole/checkpoints/final/adapter_model.safetensors"))
    b = load_file(str(split / "checkpoints/final/adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_130(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_model_dir, out)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = proc.communicate(timeout=WAIT_TIMEOUT)
    assert proc.returncode == 130, stderr
    latest = ckpt.latest(out)
    assert latest is not None and latest.name.startswith("step_")
    assert ckpt.read_json(latest / "trainer_state.json")["step"] == max(read_metrics(out))
