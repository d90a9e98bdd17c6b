"""The batched greedy loop equals transformers' own greedy generate, batched or one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from app.generate import generate, length_sorted_batches
from app.modeling import load_tokenizer
from conftest import tiny_config

PROMPTS = ["Premise: Anna is reading in the park.\nHypothesis: Anna is indoors.\nAnswer: ",
           "x", "In the kitchen, Ben is cooking. " * 3, '{"thought_process": "The', "Hugo is outdoors."]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, load_tokenizer(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("g")))


def reference(model, tokenizer, prompt: str, n: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def test_matches_transformers_generate_batched_and_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    want = [reference(model, tok, p, 12) for p in PROMPTS]
    assert generate(model, tok, PROMPTS, batch_size=8, max_new_tokens=12, device="cpu", stop=None) == want
    assert generate(model, tok, PROMPTS, batch_size=1, max_new_tokens=12, device="cpu", stop=None) == want


def test_rows_stop_when_their_json_closes(model_and_tokenizer):
    model, tok = model_and_tokenizer
    seen = []

    def stop(text):
        seen.append(text)
        return True  # every row stops at its first trigger token

    out = generate(model, tok, PROMPTS, batch_size=8, max_new_tokens=30, device="cpu", stop=stop, stop_chars="e")
    full = generate(model, tok, PROMPTS, batch_size=8, max_new_tokens=30, device="cpu", stop=None)
    for short, long in zip(out, full):
        assert long.startswith(short)
        if "e" in long:  # cut right after the first token holding an "e"
            assert "e" in short and len(short) <= len(long)
    assert seen


def test_length_sorted_batches_cover_every_index_once():
    batches = length_sorted_batches([5, 1, 9, 3, 7, 2, 8], 3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [2, 6, 4]
