"""Pad and EOS handling and byte fallback on the real Mistral tokenizer and the in-repo tiny one; the tiny model's
determinism. The NLI task's prompt/response masking is in test_nli_cot.py."""

from __future__ import annotations

import hashlib

from app.lm.modeling import load_tokenizer
from app.lm.tiny import write_tiny_model
from conftest import tiny_config


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


def test_tiny_tokenizer_renders_chat_requests(tiny_model_dir):
    """A chat server needs a template: the tiny model's renders every message and the assistant's turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "system: Be brief.\nuser: Hi?\nassistant: "
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
