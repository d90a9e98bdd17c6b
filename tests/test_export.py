"""`python -m app export`: a merged model that plain transformers loads (in a process without this package) with the
adapter model's logits, a clean adapter copy, and serving commands that parse."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.cli import main
from conftest import tiny_config

PROMPT = "The cat sits in the kitchen. Is the cat indoors?"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA run on the tiny model (a few steps, learning rate high enough to move the adapter off zero)."""
    from app.train import train

    out = tmp_path_factory.mktemp("export") / "run"
    cfg = tiny_config(tiny_model_dir, out, finetuning="lora", lora_r=4, lora_alpha=8, max_steps=3, batch_size=4,
                      micro_batch_size=4, learning_rate=5e-2, save_every=1000, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"])
    assert train(cfg) == 0
    return out / "checkpoints" / "final"


def adapter_logits(checkpoint: Path) -> torch.Tensor:
    from app.lm.modeling import load_for_inference
    from app.runs import checkpoint_config

    cfg = checkpoint_config(checkpoint)
    model, tok = load_for_inference(checkpoint, cfg, torch.device("cpu"))
    with torch.no_grad():
        return model(**tok(PROMPT, return_tensors="pt")).logits


def test_merge_loads_in_plain_transformers_with_equal_logits(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--output", str(out), "--merge"]) == 0
    printed = capsys.readouterr().out
    assert "merged model" in printed and "merged in float32" in printed
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert not names & {"optimizer.safetensors", "trainer_state.json", "adapter_config.json", "manifest.json"}
    assert not any(n.endswith(".bin") for n in names)

    ref = adapter_logits(lora_run)
    lora_B = [v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(lora_run / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert any(float(b.abs().max()) > 0 for b in lora_B), "the adapter never moved: the test would prove nothing"

    # a fresh interpreter that never imports `app` (run outside the repo, without it on the path)
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, use_safetensors=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"x = t({PROMPT!r}, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    torch.save(m(**x).logits, sys.argv[1])\n"
        "assert 'app' not in sys.modules\n"
    )
    dump = tmp_path / "logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, str(dump)], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plain = torch.load(dump)
    from app.export import MERGE_TOLERANCE

    assert plain.shape == ref.shape
    assert float((plain - ref).abs().max()) <= MERGE_TOLERANCE


def parse_vllm(command: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm", add_help=False)
    parser.add_argument("sub", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-modules", nargs="+")
    parser.add_argument("--max-lora-rank", type=int)
    parser.add_argument("--served-model-name")
    parser.add_argument("--port", type=int)
    args, rest = parser.parse_known_args(shlex.split(command)[1:])
    assert not rest, rest
    return args


def test_adapter_export_prints_vllm_lora_command(lora_run, tmp_path, capsys):
    from app.runs import checkpoint_config

    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--output", str(out)]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
                                               "generation_config.json"}
    assert not (out / "optimizer.safetensors").exists()
    vllm = next(ln for ln in lines if ln.startswith("vllm serve"))
    args = parse_vllm(vllm)
    assert args.enable_lora and args.model == checkpoint_config(lora_run).model_name
    name, path = args.lora_modules[0].split("=", 1)
    assert name and Path(path) == out
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    assert rank == 4 and args.max_lora_rank == 8  # the smallest rank vLLM accepts that holds r=4
    tf = next(ln for ln in lines if ln.startswith("transformers serve"))
    assert shlex.split(tf)[2] == str(out)


def test_merged_export_prints_plain_vllm_command(lora_run, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["export", str(lora_run), "--output", str(out), "--merge"]) == 0
    vllm = next(ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("vllm serve"))
    args = parse_vllm(vllm)
    assert Path(args.model) == out and not args.enable_lora and args.max_lora_rank is None


def test_modules_to_save_must_be_merged():
    from app.export import adapter_blockers, serve_commands, vllm_max_lora_rank

    assert adapter_blockers({"r": 8, "modules_to_save": ["score"]})
    assert adapter_blockers({"r": 8, "trainable_token_indices": [5, 6]})
    assert adapter_blockers({"r": 8, "modules_to_save": None}) == []
    assert vllm_max_lora_rank(16) == 16 and vllm_max_lora_rank(17) == 32
    assert "--max-lora-rank 64" in serve_commands(Path("x"), False, "base", {"r": 64})[0]


def test_export_refuses_a_non_empty_output(lora_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(lora_run), "--output", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def token_adapter_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A confidence-tokens LoRA run: its adapter carries trainable token rows (the added <C_...>/<U_...> tokens)."""
    from test_confidence_tokens import ct_config

    from app.train import train

    out = tmp_path_factory.mktemp("export-ct") / "run"
    cfg = ct_config(tiny_model_dir, out, finetuning="lora", target_modules=["q_proj", "v_proj"], max_steps=1,
                    batch_size=4, micro_batch_size=4, save_every=1000, validation_files={}, dev_file=None)
    assert train(cfg) == 0
    return out / "checkpoints" / "final"


def test_adapter_with_token_rows_says_merge_first_and_merges(token_adapter_run, tmp_path, capsys):
    adapter_cfg = json.loads((token_adapter_run / "adapter_config.json").read_text())
    assert adapter_cfg.get("trainable_token_indices")
    assert main(["export", str(token_adapter_run), "--output", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "export it with --merge" in printed and "vllm serve" not in printed
    assert "transformers serve" in printed

    out = tmp_path / "merged"
    assert main(["export", str(token_adapter_run), "--output", str(out), "--merge"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert "<C_READ>" in tok.get_vocab()  # the added tokens travel with the tokenizer
    plain = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    with torch.no_grad():
        got = plain(**tok(PROMPT + " <C_READ>", return_tensors="pt")).logits
    from app.export import MERGE_TOLERANCE
    from app.lm.modeling import load_for_inference
    from app.runs import checkpoint_config

    model, tok2 = load_for_inference(token_adapter_run, checkpoint_config(token_adapter_run), torch.device("cpu"))
    with torch.no_grad():
        ref = model(**tok2(PROMPT + " <C_READ>", return_tensors="pt")).logits
    assert got.shape == ref.shape and float((got - ref).abs().max()) <= MERGE_TOLERANCE


def test_4bit_base_is_reloaded_unquantized_for_merging(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from app.train import train

    cfg = tiny_config(tiny_model_dir, tmp_path / "q", finetuning="lora", quantization="4bit",
                      bnb_4bit_compute_dtype="bfloat16", dtype="auto", max_steps=1, batch_size=4, micro_batch_size=4,
                      target_modules=["q_proj"], save_every=1000)
    assert train(cfg) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "q"), "--output", str(out), "--merge"]) == 0
    printed = capsys.readouterr().out
    assert "trained 4bit-quantized" in printed and "reloaded unquantized in bfloat16" in printed
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert plain.dtype == torch.bfloat16 and getattr(plain.config, "quantization_config", None) is None


def test_score_head_travels_with_the_export(tiny_model_dir, tmp_path, capsys):
    """Task extras (the confidence head's score_head.safetensors) are copied beside the merged model."""
    from test_confidence_head import HEAD_FILE, ch_config

    from app.train import train

    cfg = ch_config(tiny_model_dir, tmp_path / "head", finetuning="lora", target_modules=["q_proj"], max_steps=1,
                    batch_size=4, micro_batch_size=4, dev_file=None)
    assert train(cfg) == 0
    final = tmp_path / "head" / "checkpoints" / "final"
    assert (final / HEAD_FILE).is_file()
    for merge in ([], ["--merge"]):
        out = tmp_path / f"out{len(merge)}"
        assert main(["export", str(final), "--output", str(out), *merge]) == 0
        assert (out / HEAD_FILE).read_bytes() == (final / HEAD_FILE).read_bytes()
        assert not list(out.glob("rng_rank*")) and not (out / "optimizer.safetensors").exists()
