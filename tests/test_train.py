"""Tiny end-to-end training: full, LoRA, QLoRA (4-bit on CPU), evaluation, checkpoints, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from app import checkpoint as ckpt
from app.tasks.nli_cot.task import NliCot
from app.train import train
from conftest import ALL_LINEAR, capture_model, losses, read_metrics, tiny_config


def falls(values, ratio=0.7, k=3):
    return sum(values[-k:]) / k < ratio * sum(values[:k]) / k


def test_full_finetuning_loss_falls_and_weights_change(tiny_model_dir, tmp_path, monkeypatch):
    captured = capture_model(monkeypatch)
    out = tmp_path / "full"
    assert train(tiny_config(tiny_model_dir, out, max_steps=12, batch_size=8, micro_batch_size=4)) == 0
    values = losses(out)
    assert len(values) == 12 and falls(values), values
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    final = load_file(str(out / "checkpoints/final/model.safetensors"))
    assert set(final) == set(original)
    changed = [k for k in original if not torch.equal(original[k], final[k])]
    assert len(changed) == len(original)  # every tensor trained
    trained = captured["model"].state_dict()
    assert all(torch.equal(trained[k], final[k]) for k in final)  # what was saved is what was trained
    saved_cfg = json.loads((out / "checkpoints/final/run_config.json").read_text())
    assert saved_cfg["max_steps"] == 12 and json.loads((out / "run_config.json").read_text()) == saved_cfg


def test_lora_trains_adapter_and_leaves_base_bitwise_unchanged(tiny_model_dir, tmp_path, monkeypatch):
    captured = capture_model(monkeypatch)
    out = tmp_path / "lora"
    cfg = tiny_config(tiny_model_dir, out, finetuning="lora", lora_r=8, lora_alpha=16, learning_rate=1e-2,
                      max_steps=16, batch_size=8, micro_batch_size=8, target_modules=ALL_LINEAR)
    assert train(cfg) == 0
    assert falls(losses(out), ratio=0.85), losses(out)
    model = captured["model"]
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    base = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
    assert set(base) == set(original)
    assert all(torch.equal(base[k], original[k]) for k in original)
    assert not any(p.requires_grad for p in base.values())
    adapter = load_file(str(out / "checkpoints/final/adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: training moved it


def test_final_adapter_loads_without_this_package(tiny_model_dir, tmp_path):
    out = tmp_path / "lora"
    assert train(tiny_config(tiny_model_dir, out, finetuning="lora", max_steps=3, batch_size=4,
                             micro_batch_size=4)) == 0
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
        f"m = PeftModel.from_pretrained(m, {str(out / 'checkpoints/final')!r})\n"
        "assert 'app' not in sys.modules\n"
        "print(m(torch.tensor([[1, 5, 6]])).logits.shape[-1])\n"
    )
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip().splitlines()[-1]) == load_file(str(tiny_model_dir / "model.safetensors"))[
        "lm_head.weight"].shape[0]


def test_qlora_4bit_trains_on_cpu(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    captured = capture_model(monkeypatch)
    out = tmp_path / "qlora"
    cfg = tiny_config(tiny_model_dir, out, finetuning="lora", quantization="4bit", bnb_4bit_compute_dtype="float32",
                      learning_rate=1e-2, max_steps=16, batch_size=8, micro_batch_size=8, target_modules=ALL_LINEAR)
    assert train(cfg) == 0
    assert falls(losses(out), ratio=0.85), losses(out)
    import bitsandbytes as bnb

    quantized = [m for m in captured["model"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    assert (out / "checkpoints/final/adapter_model.safetensors").is_file()


def test_eval_reports_generation_metrics_and_keeps_best_final_last_k(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    cfg = tiny_config(tiny_model_dir, out, max_steps=6, batch_size=8, micro_batch_size=8, eval_every=3,
                      save_every=2, keep_last=2, dev_file=str(tiny_model_dir.parents[2] / "x") if False else None)
    cfg.dev_file = "data/sample/dev.csv"
    cfg.eval_rows = 8
    cfg.max_new_tokens = 8
    assert train(cfg) == 0
    metrics = read_metrics(out)
    for step in (3, 6):
        assert {"eval/dev_loss", "eval/accuracy", "eval/macro_f1", "eval/parse_failures"} <= set(metrics[step])
        assert 0.0 <= metrics[step]["eval/accuracy"] <= 1.0
    names = sorted(p.name for p in ckpt.checkpoints_dir(out).iterdir())
    assert names == ["best", "final", "step_0000002", "step_0000004"]
    best = ckpt.read_json(out / "checkpoints/best/trainer_state.json")
    record = best["best"]["best"]
    assert record["metric"] == "macro_f1" and record["step"] in (3, 6)
    assert record["value"] == metrics[record["step"]]["eval/macro_f1"]


def test_rerun_of_a_finished_run_does_not_train_again(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "done"
    cfg = tiny_config(tiny_model_dir, out, max_steps=2, batch_size=4, micro_batch_size=4)
    assert train(cfg) == 0
    before = (out / "checkpoints/final/model.safetensors").stat().st_mtime_ns
    assert train(cfg) == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / "checkpoints/final/model.safetensors").stat().st_mtime_ns == before
    cfg.resume = "fresh"
    assert train(cfg) == 0
    assert len(list(out.glob("checkpoints.old-*/final/model.safetensors"))) == 1  # moved aside, not deleted


def test_overlength_examples_are_counted_and_handled(tiny_model_dir, tmp_path, caplog):
    from app.errors import UserError
    from app.lm.modeling import load_tokenizer
    from app.engine.loop import encode_all

    task = NliCot()
    cfg = tiny_config(tiny_model_dir, tmp_path, max_seq_length=90)
    tok = load_tokenizer(cfg)
    rows = task.load_rows(cfg, "train")[:50]
    full = [task.encode(r, tok, cfg) for r in rows]
    over = sum(len(f.input_ids) > 90 for f in full)
    assert 0 < over < 50
    cfg.overlength = "drop"
    assert len(encode_all(task, rows, tok, cfg, "train.csv")) == 50 - over
    assert f"{over} of 50 examples longer than max_seq_length=90" in caplog.text
    cfg.overlength = "truncate"
    cut = encode_all(task, rows, tok, cfg, "train.csv")
    assert len(cut) == 50 and max(len(f.input_ids) for f in cut) == 90
    for f, orig in zip(cut, full):  # the response (every loss token) survives truncation
        assert [t for t in f.labels if t != -100] == [t for t in orig.labels if t != -100]
        assert f.input_ids[0] == tok.bos_token_id
        if len(orig.input_ids) > 90:  # the middle of the prompt goes: its head (the instruction) stays
            assert f.input_ids[:25] == orig.input_ids[:25] and f.input_ids[-40:] == orig.input_ids[-40:]
    cfg.overlength = "error"
    with pytest.raises(UserError, match=r"train.csv:\d+: \d+ tokens > max_seq_length=90"):
        encode_all(task, rows, tok, cfg, "train.csv")


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, tmp_path):
    runs = {}
    for gc in (False, True):  # prefix sharing off on both sides: checkpointing turns it off, the same forward
        out = tmp_path / f"gc{gc}"
        assert train(tiny_config(tiny_model_dir, out, finetuning="lora", gradient_checkpointing=gc, max_steps=4,
                                 batch_size=4, micro_batch_size=4, lora_dropout=0.0, share_prompt_prefix=False)) == 0
        runs[gc] = read_metrics(out)
    # measured bitwise equal on AVX-512 and AVX2 kernels (the recomputation runs the same kernels); the tolerances
    # leave room for a kernel library that picks another algorithm for the recomputed tensors' memory layout
    for step in range(1, 5):
        assert runs[True][step]["loss"] == pytest.approx(runs[False][step]["loss"], rel=1e-5)
        assert runs[True][step]["grad_norm"] == pytest.approx(runs[False][step]["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("scheduler, warmup", [("cosine", dict(warmup_steps=3)), ("linear", dict(warmup_ratio=0.25)),
                                               ("constant", dict(warmup_steps=2))])
def test_learning_rate_schedule(tiny_model_dir, tmp_path, scheduler, warmup):
    import math

    out = tmp_path / scheduler
    cfg = tiny_config(tiny_model_dir, out, lr_scheduler=scheduler, max_steps=8, batch_size=4, micro_batch_size=4,
                      learning_rate=1e-3, **{"warmup_steps": None, **warmup})
    assert train(cfg) == 0
    lrs = [v["lr"] for _, v in sorted(read_metrics(out).items()) if "lr" in v]
    total, w = 8, warmup.get("warmup_steps") or math.ceil(warmup["warmup_ratio"] * 8)

    def expected(step):  # lr in effect for the step after `step` optimizer steps
        if step < w:
            return 1e-3 * step / w
        progress = (step - w) / (total - w)
        return 1e-3 * {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress,
                       "constant": 1.0}[scheduler]

    assert lrs == pytest.approx([expected(s) for s in range(1, total + 1)], abs=1e-12)
