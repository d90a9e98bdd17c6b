"""Prompt/response masking, EOS and pad handling, on the real Mistral tokenizer and the in-repo tiny one."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.data import Row
from app.tasks.nli_cot.extract import extract_label
from app.lm.modeling import load_tokenizer
from app.tasks.nli_cot.prompts import build_prompt, build_target
from app.tasks.nli_cot.task import NliCot
from app.lm.tiny import write_tiny_model
from conftest import ROOT, tiny_config

ROW = {"premise": "Zoë's café — naïve résumé 😀 stays open.", "hypothesis": "The café is closed.", "label": 0,
       "thought_process": 'The premise says "open"; the hypothesis says closed.'}


@pytest.fixture(params=["mistral", "tiny"])
def tokenizer_and_cfg(request, tmp_path, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    if request.param == "mistral":
        cfg.tokenizer_name = str(request.getfixturevalue("mistral_tokenizer_dir"))
    return load_tokenizer(cfg), cfg


def test_loss_only_on_response_and_eos(tokenizer_and_cfg):
    tok, cfg = tokenizer_and_cfg
    f = NliCot().encode(Row(2, dict(ROW)), tok, cfg)
    prompt_ids = tok(build_prompt(ROW, cfg)).input_ids
    n = len(prompt_ids)
    assert f.input_ids[:n] == prompt_ids and f.labels[:n] == [-100] * n
    target = f.labels[n:]
    assert -100 not in target and target == f.input_ids[n:]
    assert target[-1] == tok.eos_token_id
    text = tok.decode(target[:-1])
    assert json.loads(text) == {"thought_process": ROW["thought_process"], "predicted_label": 0}
    assert extract_label(tok.decode(target, skip_special_tokens=True)).label == 0
    assert NliCot().loss_items(f) == len(target)


def test_label_only_target_without_thought(tokenizer_and_cfg):
    tok, cfg = tokenizer_and_cfg
    row = {**ROW, "thought_process": "", "label": 1}
    f = NliCot().encode(Row(2, row), tok, cfg)
    target = [t for t in f.labels if t != -100]
    assert json.loads(tok.decode(target[:-1])) == {"predicted_label": 1} and target[-1] == tok.eos_token_id
    assert build_target(1, None) == '{"predicted_label": 1}'


def test_pad_is_not_eos_and_saved_padding_is_not_inherited(tokenizer_and_cfg):
    tok, _ = tokenizer_and_cfg
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    short = tok("a b").input_ids
    assert len(short) < 10  # not padded to a fixed length
    long = tok(" word" * 3000).input_ids
    assert len(long) > 2048  # not truncated either
    batch = tok(["a", "a b c d e"], padding=True, padding_side="left")
    assert batch.input_ids[0][0] == tok.pad_token_id and batch.attention_mask[0][0] == 0


def test_real_tokenizer_byte_fallback_round_trips(mistral_tokenizer_dir, tmp_path, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, tmp_path, tokenizer_name=str(mistral_tokenizer_dir))
    tok = load_tokenizer(cfg)
    assert len(tok) == 32000
    text = "⟂ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ 中文"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_tiny_model_is_deterministic_and_loads_through_from_pretrained(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = write_tiny_model(tmp_path / "again")

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(again / name) == digest(tiny_model_dir / name), name
    model = AutoModelForCausalLM.from_pretrained(str(again))
    tok = AutoTokenizer.from_pretrained(str(again))
    assert model.config.model_type == "mistral" and model.config.vocab_size == len(tok)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)


def test_sample_data_is_the_generator_output(tmp_path):
    from app.tasks.nli_cot.sample import write_sample

    write_sample(tmp_path)
    for split in ("train", "dev", "test"):
        assert (tmp_path / f"{split}.csv").read_bytes() == (ROOT / "data/sample" / f"{split}.csv").read_bytes()
