"""FSDP2 (`parallelism='fsdp'`) on two CPU processes (torchrun, gloo): the same training as one process and as two
DDP processes, exact resume after SIGKILL, resume on another number of processes, and a consolidated checkpoint that
plain transformers loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from app import checkpoint as ckpt
from app.pipelines.serve import free_port
from app.train import train
from conftest import ROOT, read_metrics, tiny_args, tiny_config

# full fine-tuning: what sharding is for (parameters, gradients and optimizer state all split)
FULL = dict(finetuning="full", learning_rate=1e-3, max_steps=6, batch_size=8, micro_batch_size=2, save_every=3,
            share_prompt_prefix=False)
LORA = dict(FULL, finetuning="lora", lora_dropout=0.0, learning_rate=1e-2, max_steps=8, save_every=2,
            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
# Every comparison runs the same forward on both sides (prefix sharing off: FSDP2 turns it off, so the others do
# too); what is left is float32 sums in another order (per-process partial sums, then a reduce-scatter).
# Measured floors, AVX-512 / AVX2 kernels, FULL (6 steps): loss 9.0e-8 / 9.9e-8 relative, grad norm 2.0e-7 / 2.6e-7
# relative, weights 6.0e-8 / 1.8e-7 absolute (one process, DDP and FSDP2 pairwise); the ranking run: losses and
# head bitwise equal, grad norm 0 / 7.2e-8.
LOSS_TOLERANCE = 1e-5  # 100x the floor
GRAD_NORM_TOLERANCE = 1e-4  # 400x; a wrongly scaled gradient is off by a factor, not 1e-4
# Adam divides by sqrt(v): a near-zero gradient turns a 1e-7 difference into a visible update. The largest floor is
# LoRA's at lr=1e-2 (tests/test_distributed.py): 8.1e-6 / 3.8e-6, so 12x; 1e-4 is 1% of one step at lr=1e-2
WEIGHT_TOLERANCE = 1e-4
# a hang guard, not a speed check: a two-process test here took 10-90 s at a load average of 14 on 2 cores
LAUNCH_TIMEOUT = 900



def torchrun(model_dir, out, run: dict, nproc: int = 2, **extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", "app", "train", "configs/tiny.py", *tiny_args(model_dir, out, **run, **extra)]


def run2(model_dir, out, run: dict, **extra) -> subprocess.CompletedProcess:
    r = subprocess.run(torchrun(model_dir, out, run, **extra), cwd=ROOT, capture_output=True, text=True,
                       timeout=LAUNCH_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(out, name="model.safetensors") -> dict:
    return load_file(str(out / "checkpoints/final" / name))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_losses(got_dir, want_dir, steps: int) -> None:
    got, want = read_metrics(got_dir), read_metrics(want_dir)
    assert sorted(s for s in got if "loss" in got[s]) == list(range(1, steps + 1))
    assert [got[s]["loss"] for s in range(1, steps + 1)] == pytest.approx(
        [want[s]["loss"] for s in range(1, steps + 1)], rel=LOSS_TOLERANCE)
    assert [got[s]["lr"] for s in range(1, steps + 1)] == [want[s]["lr"] for s in range(1, steps + 1)]
    # Adam hides a wrongly scaled gradient; the gradient norm does not
    assert [got[s]["grad_norm"] for s in range(1, steps + 1)] == pytest.approx(
        [want[s]["grad_norm"] for s in range(1, steps + 1)], rel=GRAD_NORM_TOLERANCE)


@pytest.fixture(scope="module")
def one_full(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "one"
    assert train(tiny_config(tiny_model_dir, out, **FULL)) == 0
    return out


@pytest.fixture(scope="module")
def fsdp_full(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "two"
    r = run2(tiny_model_dir, out, FULL, parallelism="fsdp")
    assert "2 x 2 accumulation x 2 processes (FSDP2)" in r.stderr  # really sharded, over two processes
    return out


@pytest.mark.slow
def test_fsdp_full_finetune_matches_one_process_and_ddp(tiny_model_dir, tmp_path, one_full, fsdp_full):
    ddp = tmp_path / "ddp"
    run2(tiny_model_dir, ddp, FULL)
    assert_same_losses(fsdp_full, one_full, FULL["max_steps"])
    assert_same_losses(fsdp_full, ddp, FULL["max_steps"])
    assert max_diff(weights(fsdp_full), weights(one_full)) <= WEIGHT_TOLERANCE
    assert max_diff(weights(fsdp_full), weights(ddp)) <= WEIGHT_TOLERANCE
    # one consolidated weights file, the gathered optimizer state keyed by parameter name, RNG of both ranks
    final = fsdp_full / "checkpoints/final"
    assert not list(final.glob("model-*.safetensors"))
    meta = ckpt.read_json(final / "optimizer.json")
    assert meta["keys"] == "names" and all(isinstance(p, str) for g in meta["param_groups"] for p in g["params"])
    assert sorted(p.name for p in final.glob("rng_rank*.json")) == ["rng_rank0.json", "rng_rank1.json"]


@pytest.mark.slow
def test_consolidated_checkpoint_loads_with_plain_transformers(fsdp_full, one_full):
    """A process that never imports this package loads the sharded run's final/ and gives the single-process run's
    logits (float32, the weights within WEIGHT_TOLERANCE)."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'app' not in sys.modules\n"
        "ids = torch.tensor([[1, 5, 9, 20, 33, 7]])\n"
        "out = [AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits for d in sys.argv[1:]]\n"
        "assert 'app' not in sys.modules\n"
        "print((out[0] - out[1]).abs().max().item())\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(fsdp_full / "checkpoints/final"),
                        str(one_full / "checkpoints/final")], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                       cwd="/", env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    # measured 2.4e-7 / 3.6e-7 (AVX-512 / AVX2 kernels) on logits of magnitude 0.67; the weights of three steps
    # earlier (step 3 of 6) move them by 0.32
    assert float(r.stdout.strip().splitlines()[-1]) <= 1e-4


@pytest.mark.slow
def test_checkpoints_resume_across_ddp_fsdp_and_one_process(tiny_model_dir, tmp_path, one_full):
    """Two DDP processes stop after a checkpoint, two sharded processes continue from it and stop again, one
    process finishes the run. The global batches do not depend on the number of processes (app/engine/batching.py)
    and the optimizer state is mapped by parameter name (indices -> names -> indices), so the result is the
    uninterrupted one's."""
    out = tmp_path / "run"
    run2(tiny_model_dir, out, FULL, stop_after_steps=2)
    assert ckpt.read_json(ckpt.latest(out) / "optimizer.json")["keys"] == "indices"
    # the sharded leg with its state offloaded to CPU memory: where the shards live changes no number
    run2(tiny_model_dir, out, FULL, parallelism="fsdp", fsdp_cpu_offload=True, stop_after_steps=2)
    assert ckpt.latest(out).name == ckpt.step_name(4)
    assert ckpt.read_json(ckpt.latest(out) / "optimizer.json")["keys"] == "names"
    assert train(tiny_config(tiny_model_dir, out, **FULL, parallelism="fsdp")) == 0  # one process: unsharded
    assert_same_losses(out, one_full, FULL["max_steps"])
    assert max_diff(weights(out), weights(one_full)) <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_lora_fsdp_sigkill_then_rerun_equals_uninterrupted(tiny_model_dir, tmp_path):
    reference = tmp_path / "reference"
    assert train(tiny_config(tiny_model_dir, reference, **LORA)) == 0
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # activation checkpointing on the sharded side only: it composes with FSDP2 and changes no number
    proc = subprocess.Popen(torchrun(tiny_model_dir, out, LORA, parallelism="fsdp", gradient_checkpointing=True),
                            cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = out / "checkpoints" / ckpt.step_name(2)
    try:
        while not first.is_dir():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    finally:
        proc.wait(timeout=LAUNCH_TIMEOUT)
    assert not (out / "checkpoints/final").exists()
    run2(tiny_model_dir, out, LORA, parallelism="fsdp", gradient_checkpointing=True)
    assert_same_losses(out, reference, LORA["max_steps"])
    name = "adapter_model.safetensors"
    assert max_diff(weights(out, name), weights(reference, name)) <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_lora_under_fsdp_trains_the_adapter_only(tiny_model_dir):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        "tests/fsdp_lora_worker.py", str(tiny_model_dir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=LAUNCH_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK 21 base tensors unchanged" in r.stdout


@pytest.mark.slow
def test_ranking_with_its_score_head_under_fsdp_matches_ddp(tmp_path):
    """A task with a head beside the model (in the root unit) and a prefix-sharing forward (turned off under FSDP2,
    and said so): the same losses and the same saved head as two DDP processes running the same forward (sharing
    off). Against DDP with sharing on, another float32 computation which Adam amplifies, the head differed by 2.5e-5
    (AVX-512 kernels), 1.6e-4 (AVX2) and 5.0e-4 (another CPU); like for like it is bitwise equal on both paths."""
    runs, note = {}, "parallelism='fsdp': share_prompt_prefix=False, share_question_prefix=False"
    for parallelism, sharing in (("ddp", ["--share_prompt_prefix=False", "--share_question_prefix=False"]),
                                 ("fsdp", [])):  # FSDP2 turns both off itself
        out = tmp_path / parallelism
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "app", "train", "configs/ranking_tiny.py", "--max_steps=3", "--save_every=100", "--log_every=1",
               "--eval_every=100", "--micro_batch_size=4", f"--out_dir={out}", f"--parallelism={parallelism}",
               "--tensorboard=False", *sharing]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert (note in r.stderr) == (parallelism == "fsdp")
        runs[parallelism] = out
    assert_same_losses(runs["fsdp"], runs["ddp"], 3)
    head = "score_head.safetensors"
    assert max_diff(weights(runs["fsdp"], head), weights(runs["ddp"], head)) <= WEIGHT_TOLERANCE


# --- pieces, in-process -------------------------------------------------------------------------------------
def test_optimizer_state_rekeys_between_names_and_indices(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias], "lr": 0.1}])
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    names = ["0.weight", "2.weight", "0.bias"]
    by_name = ckpt.keyed_by(opt.state_dict(), names, by_name=True)
    assert sorted(by_name["state"]) == sorted(names)
    assert by_name["param_groups"][1]["params"] == ["0.bias"]
    ckpt.save_optimizer_state(by_name, tmp_path)
    back = ckpt.keyed_by(ckpt.read_optimizer_state(tmp_path), names, by_name=False)
    assert [(g["params"], g["lr"]) for g in back["param_groups"]] == [(g["params"], g["lr"])
                                                                      for g in opt.state_dict()["param_groups"]]
    for i, state in opt.state_dict()["state"].items():
        assert torch.equal(back["state"][i]["exp_avg"], state["exp_avg"])


def test_fsdp_refuses_quantized_weights(tiny_model_dir, tmp_path):
    from app.engine.loop import uses_fsdp
    from app.errors import UserError

    cfg = tiny_config(tiny_model_dir, tmp_path, finetuning="lora", quantization="4bit", parallelism="fsdp")
    with pytest.raises(UserError, match="parallelism='fsdp' does not shard quantized weights"):
        uses_fsdp(cfg, 2)
    assert uses_fsdp(cfg.model_copy(update={"quantization": None}), 1) is False  # one process: nothing to shard


def test_default_blocks_are_the_decoder_layers(tiny_model_dir, tmp_path):
    from app.tasks import get_task

    cfg = tiny_config(tiny_model_dir, tmp_path, finetuning="lora")
    task = get_task(cfg.task)
    model, tokenizer = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    blocks = task.model_kind(cfg).shard_blocks(task.objective(model, tokenizer, cfg))
    assert [type(b).__name__ for b in blocks] == ["MistralDecoderLayer"] * model.config.num_hidden_layers
