"""The tokenization cache: a hit skips encoding and gives the same features; any change to data, tokenizer,
encoding settings re-tokenizes; resume stays exact with the cache on and off."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from app.engine import token_cache
from app.engine.loop import encode_all, train
from app.lm.modeling import load_tokenizer
from app.tasks import get_task
from conftest import ROOT, read_metrics, tiny_config

RUN = dict(finetuning="lora", lora_dropout=0.2, learning_rate=1e-2, max_steps=8, batch_size=8, micro_batch_size=4,
           save_every=3, keep_last=2, warmup_steps=2)


class Counting:
    """encode_all, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return encode_all(*args)


def setup(tiny_model_dir, tmp_path, **overrides):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", **overrides)
    task = get_task(cfg.task)
    return cfg, task, task.load_rows(cfg, "train"), load_tokenizer(cfg)


def same(a, b):
    return [(f.input_ids, f.labels, f.line, f.extra) for f in a] == [(f.input_ids, f.labels, f.line, f.extra) for f in b]


def test_hit_skips_encoding_and_gives_the_same_features(tiny_model_dir, tmp_path):
    cfg, task, rows, tok = setup(tiny_model_dir, tmp_path)
    enc = Counting()
    first = token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    second = token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    assert enc.calls == 1 and same(first, second) and same(first, encode_all(task, rows, tok, cfg, cfg.train_file))
    entries = list((tmp_path / "run" / "token_cache").iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"features.safetensors", "meta.json"}
    # a config field that does not touch encoding (the learning rate) still hits
    cfg2, *_ = setup(tiny_model_dir, tmp_path, learning_rate=1e-3, stop_after_steps=2)
    token_cache.encode_cached(task, rows, tok, cfg2, cfg.train_file, "train", enc)
    assert enc.calls == 1


def test_any_change_re_tokenizes(tiny_model_dir, tmp_path):
    cfg, task, rows, tok = setup(tiny_model_dir, tmp_path, token_cache_dir=str(tmp_path / "cache"))
    enc = Counting()
    token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    token_cache.encode_cached(task, rows[:-1], tok, cfg, cfg.train_file, "train", enc)  # data
    assert enc.calls == 2
    cfg_len, *_ = setup(tiny_model_dir, tmp_path, token_cache_dir=str(tmp_path / "cache"), max_seq_length=40)
    short = token_cache.encode_cached(task, rows, tok, cfg_len, cfg.train_file, "train", enc)  # settings
    assert enc.calls == 3 and max(len(f.input_ids) for f in short) <= 40
    cfg_tpl, *_ = setup(tiny_model_dir, tmp_path, token_cache_dir=str(tmp_path / "cache"),
                        prompt_template="P: {premise} H: {hypothesis}")
    token_cache.encode_cached(task, rows, tok, cfg_tpl, cfg.train_file, "train", enc)  # the task's own setting
    assert enc.calls == 4
    tok.add_special_tokens({"additional_special_tokens": ["<NEW>"]})  # tokenizer
    token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    assert enc.calls == 5
    assert len(list((tmp_path / "cache").iterdir())) == 5  # a shared cache keeps every entry


def test_off_always_encodes_and_a_broken_entry_is_rebuilt(tiny_model_dir, tmp_path):
    cfg, task, rows, tok = setup(tiny_model_dir, tmp_path, token_cache=False)
    enc = Counting()
    token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    assert enc.calls == 2 and not (tmp_path / "run" / "token_cache").exists()
    cfg, *_ = setup(tiny_model_dir, tmp_path)
    first = token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()
    (entry / "features.safetensors").write_bytes(b"broken")
    again = token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    assert enc.calls == 4 and same(first, again)


def test_confidence_head_features_keep_their_extras(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", task="confidence_head",
                      train_file=str(ROOT / "data/sample/steps/train.jsonl"))
    task = get_task("confidence_head")
    rows = task.load_rows(cfg, "train")[:40]
    tok = load_tokenizer(cfg)
    tok.add_special_tokens({"additional_special_tokens": task.added_tokens(cfg)})
    enc = Counting()
    first = token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    second = token_cache.encode_cached(task, rows, tok, cfg, cfg.train_file, "train", enc)
    assert enc.calls == 1 and any(f.extra for f in first) and same(first, second)


@pytest.mark.parametrize("cache", [True, False])
def test_resume_is_exact_with_the_cache_on_and_off(tiny_model_dir, tmp_path, cache, caplog):
    ref = tmp_path / "ref"
    assert train(tiny_config(tiny_model_dir, ref, token_cache=False, **RUN)) == 0
    out = tmp_path / "run"
    assert train(tiny_config(tiny_model_dir, out, token_cache=cache, stop_after_steps=3, **RUN)) == 0
    assert (out / "token_cache").exists() == cache
    caplog.clear()
    with caplog.at_level("INFO", logger="app.engine.token_cache"):
        assert train(tiny_config(tiny_model_dir, out, token_cache=cache, **RUN)) == 0  # resumes
    assert ("tokenized examples from the cache" in caplog.text) == cache  # the resume's tokenizer hits the entry
    a = load_file(str(out / "checkpoints/final/adapter_model.safetensors"))
    b = load_file(str(ref / "checkpoints/final/adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    got, want = read_metrics(out), read_metrics(ref)
    assert [got[s]["loss"] for s in sorted(got)] == pytest.approx([want[s]["loss"] for s in sorted(want)], abs=1e-6)
    sources = json.loads((out / "data_sources.json").read_text())
    assert sources[0]["kind"] == "csv" and len(sources[0]["fingerprint"]) == 64
