"""The CUDA paths on the tiny model: bf16 LoRA and 4-bit QLoRA training, shared-prefix loss under autocast, greedy
generation against transformers', a checkpoint reloaded for inference, fused AdamW, flash attention.

Marked `cuda`: skipped without a GPU (every CPU run, CI included); tests/gpu/check.sh runs them on one
(`pytest -m cuda`)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import capture_model, losses, tiny_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tests/gpu/check.sh runs these on one)"),
]

CUDA = torch.device("cuda")
BF16 = dict(dtype="bfloat16", mixed_precision="bf16")


def test_bf16_lora_trains_on_the_gpu(tiny_model_dir, tmp_path, monkeypatch):
    from app.train import train

    captured = capture_model(monkeypatch)
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, out, finetuning="lora", learning_rate=1e-2, max_steps=6, batch_size=8,
                      micro_batch_size=4, **BF16)
    assert train(cfg) == 0
    values = losses(out)
    assert len(values) == 6 and all(math.isfinite(v) for v in values), values
    model = captured["model"]
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert (out / "checkpoints/final/adapter_model.safetensors").is_file()


def test_qlora_4bit_trains_on_the_gpu(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from app.train import train

    captured = capture_model(monkeypatch)
    out = tmp_path / "qlora"
    cfg = tiny_config(tiny_model_dir, out, finetuning="lora", quantization="4bit", bnb_4bit_compute_dtype="bfloat16",
                      max_steps=4, batch_size=4, micro_batch_size=4, **BF16)
    assert train(cfg) == 0
    assert all(math.isfinite(v) for v in losses(out))
    quantized = [m for m in captured["model"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)


def test_shared_prefix_gives_the_same_loss_and_gradients_on_the_gpu(tiny_model_dir, tmp_path):
    """fp32 (TF32 off): the prompt prefix computed once and broadcast equals the plain forward, loss and gradients,
    as on CPU; under bf16 autocast the two stay within bf16 rounding."""
    from app.lm.forward import CompletionLoss
    from app.tasks.nli_cot.task import NliCot

    cfg = tiny_config(tiny_model_dir, tmp_path, finetuning="lora", lora_dropout=0.0)
    task = NliCot()
    torch.manual_seed(0)
    model, tok = task.model_kind(cfg).load(cfg, CUDA)
    model.to(CUDA)
    features = [task.encode(r, tok, cfg) for r in task.load_rows(cfg, "train")[:6]]
    batch = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in task.collate(features, tok.pad_token_id).items()}
    assert batch["shared_prefix"] > 0

    def loss_and_grads(share: bool):
        model.zero_grad()
        loss = CompletionLoss(model, share_prefix=share)(**batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    torch.backends.cuda.matmul.allow_tf32 = False
    shared, plain = loss_and_grads(True), loss_and_grads(False)
    assert shared[0] == pytest.approx(plain[0], rel=1e-5)
    assert shared[1].keys() == plain[1].keys() and shared[1]
    for name, grad in plain[1].items():
        torch.testing.assert_close(shared[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = CompletionLoss(model, share_prefix=True)(**batch).float().item()
        b = CompletionLoss(model, share_prefix=False)(**batch).float().item()
    assert a == pytest.approx(b, rel=1e-2)


def test_generation_matches_transformers_generate_on_the_gpu(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from app.lm.generate import StopRule, generate
    from app.lm.modeling import load_tokenizer
    from app.tasks.nli_cot.prompts import build_prompt

    cfg = tiny_config(tiny_model_dir, tmp_path)
    tok = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).to(CUDA).eval()
    rows = [("In the museum, Carla is cooking.", "Carla is cooking indoors."), ("x", "y"),
            ("In the beach, Grace is waiting. " * 4, "Grace is waiting indoors.")]
    prompts = [build_prompt({"premise": p, "hypothesis": h}, cfg) for p, h in rows] + ["Hugo is outdoors."]
    want = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(CUDA)
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        want.append(tok.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    assert generate(model, tok, prompts, batch_size=8, max_new_tokens=12, device=CUDA, rule=StopRule()) == want


def test_checkpoint_reloads_and_predicts_on_the_gpu(tiny_model_dir, tmp_path):
    from app.train import train
    from app.lm.modeling import load_for_inference
    from app.runs import checkpoint_config
    from app.tasks.nli_cot.task import NliCot

    out = tmp_path / "run"
    assert train(tiny_config(tiny_model_dir, out, finetuning="lora", max_steps=2, batch_size=4, micro_batch_size=4,
                             **BF16)) == 0
    final = out / "checkpoints/final"
    cfg = checkpoint_config(final, ["--max_new_tokens=8"])
    model, tok = load_for_inference(final, cfg, CUDA)
    assert next(model.parameters()).device.type == "cuda"
    rows = [{"premise": "In the kitchen, Ben is cooking.", "hypothesis": "Ben is indoors."}] * 3
    preds = [p for _, batch in NliCot().predict_batches(model, tok, cfg, rows, CUDA, 2) for p in batch]
    assert len(preds) == 3 and {p.label for p in preds} <= {0, 1}


def test_adamw_is_fused_for_gpu_parameters():
    from app.config import make_config
    from app.engine.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(4, 4, device=CUDA))]
    opt = make_optimizer(make_config(), [{"params": params}])
    assert opt.defaults["fused"] is True
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert torch.isfinite(params[0]).all() and params[0].abs().sum() > 0


def test_flash_attention_matches_sdpa(tiny_model_dir):
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]], device=CUDA)
    logits = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16,
                                                     attn_implementation=attn).to(CUDA).eval()
        with torch.no_grad():
            logits[attn] = model(input_ids=ids).logits.float()
    torch.testing.assert_close(logits["flash_attention_2"], logits["sdpa"], rtol=2e-2, atol=2e-2)
