"""The tokenization cache: a hit skips encoding and gives the same features; any change to data, tokenizer,
encoding settings re-tokenizes; rows read from a file are keyed by its bytes; cached features are array-backed and
collate to the same tensors; num_proc > 1 gives the features and warnings of one process; resume stays exact with the
cache on and off."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app.data import read_rows
from app.engine import token_cache
from app.engine.loop import encode_all
from app.train import train
from app.errors import UserError
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
    first = token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    second = token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    assert enc.calls == 1 and same(first, second) and same(first, encode_all(task, rows, tok, cfg, cfg.train_file))
    entries = list((tmp_path / "run" / "token_cache").iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"features.safetensors", "meta.json"}
    # a config field that does not touch encoding (the learning rate) still hits
    cfg2, *_ = setup(tiny_model_dir, tmp_path, learning_rate=1e-3, stop_after_steps=2)
    token_cache.encode_cached(task, rows, tok, cfg2, "train", enc)
    assert enc.calls == 1


def test_any_change_re_tokenizes(tiny_model_dir, tmp_path):
    cfg, task, rows, tok = setup(tiny_model_dir, tmp_path, token_cache_dir=str(tmp_path / "cache"))
    enc = Counting()
    token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    token_cache.encode_cached(task, rows[:-1], tok, cfg, "train", enc)  # data
    assert enc.calls == 2
    cfg_len, *_ = setup(tiny_model_dir, tmp_path, token_cache_dir=str(tmp_path / "cache"), max_seq_length=40)
    short = token_cache.encode_cached(task, rows, tok, cfg_len, "train", enc)  # settings
    assert enc.calls == 3 and max(len(f.input_ids) for f in short) <= 40
    cfg_tpl, *_ = setup(tiny_model_dir, tmp_path, token_cache_dir=str(tmp_path / "cache"),
                        prompt_template="P: {premise} H: {hypothesis}")
    token_cache.encode_cached(task, rows, tok, cfg_tpl, "train", enc)  # the task's own setting
    assert enc.calls == 4
    tok.add_special_tokens({"additional_special_tokens": ["<NEW>"]})  # tokenizer
    token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    assert enc.calls == 5
    assert len(list((tmp_path / "cache").iterdir())) == 5  # a shared cache keeps every entry


def test_off_always_encodes_and_a_broken_entry_is_rebuilt(tiny_model_dir, tmp_path):
    cfg, task, rows, tok = setup(tiny_model_dir, tmp_path, token_cache=False)
    enc = Counting()
    token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    assert enc.calls == 2 and not (tmp_path / "run" / "token_cache").exists()
    cfg, *_ = setup(tiny_model_dir, tmp_path)
    first = token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()
    (entry / "features.safetensors").write_bytes(b"broken")
    again = token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    assert enc.calls == 4 and same(first, again)


def test_confidence_head_features_keep_their_extras(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", task="confidence_head",
                      train_file=str(ROOT / "data/sample/steps/train.jsonl"))
    task = get_task("confidence_head")
    rows = task.load_rows(cfg, "train")[:40]
    tok = load_tokenizer(cfg)
    tok.add_special_tokens({"additional_special_tokens": list(task.model_kind(cfg).added_tokens)})
    enc = Counting()
    first = token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    second = token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    assert enc.calls == 1 and any(f.extra for f in first) and same(first, second)


def test_file_rows_are_keyed_by_the_file_bytes(tiny_model_dir, tmp_path):
    source = tmp_path / "train.csv"
    shutil.copy(ROOT / "data/sample/train.csv", source)
    cfg, task, rows, tok = setup(tiny_model_dir, tmp_path, train_file=str(source))
    assert rows.fingerprint and token_cache.rows_identity(rows) == token_cache.rows_identity(task.load_rows(cfg, "train"))
    # the same bytes elsewhere are the same data (no row is hashed: the key comes from the file)
    moved = tmp_path / "moved.csv"
    shutil.copy(source, moved)
    assert token_cache.rows_identity(read_rows(moved)) == token_cache.rows_identity(read_rows(source))
    enc = Counting()
    token_cache.encode_cached(task, rows, tok, cfg, "train", enc)
    token_cache.encode_cached(task, task.load_rows(cfg, "train"), tok, cfg, "train", enc)
    assert enc.calls == 1
    # one changed byte is new data; a list that is not the one read (a copy) is keyed by its rows
    source.write_bytes(source.read_bytes().replace(b"museum", b"museun", 1))
    changed = task.load_rows(cfg, "train")
    assert token_cache.rows_identity(changed) != token_cache.rows_identity(rows)
    token_cache.encode_cached(task, changed, tok, cfg, "train", enc)
    assert enc.calls == 2
    assert token_cache.rows_identity(list(rows)) != token_cache.rows_identity(rows)
    assert token_cache.rows_identity(list(rows)) == token_cache.rows_identity(list(task.validate(source, read_rows(moved), cfg)))


@pytest.mark.parametrize("task_name", ["nli_cot", "confidence_head"])
def test_cached_features_are_array_backed_and_collate_the_same(tiny_model_dir, tmp_path, task_name):
    extra = {} if task_name == "nli_cot" else {"task": "confidence_head",
                                              "train_file": str(ROOT / "data/sample/steps/train.jsonl")}
    cfg, task, rows, tok = setup(tiny_model_dir, tmp_path, **extra)
    tok.add_special_tokens({"additional_special_tokens": list(task.model_kind(cfg).added_tokens)})
    fresh = encode_all(task, rows, tok, cfg, cfg.train_file)
    cold = token_cache.encode_cached(task, rows, tok, cfg, "train", encode_all)
    hit = token_cache.encode_cached(task, rows, tok, cfg, "train", encode_all)
    for features in (cold, hit):
        assert same(features, fresh) and all(isinstance(f.input_ids, token_cache.Tokens) for f in features)
        assert [task.loss_items(f) for f in features] == [task.loss_items(f) for f in fresh]
        for i in range(0, len(fresh), 4):
            a, b = task.collate(features[i : i + 4], tok.pad_token_id), task.collate(fresh[i : i + 4], tok.pad_token_id)
            assert a.keys() == b.keys()
            for k in a:
                assert (a[k].dtype, a[k].tolist()) == (b[k].dtype, b[k].tolist()) if torch.is_tensor(a[k]) else a[k] == b[k]


def test_tokens_read_like_the_list_they_stand_for():
    flat = np.array([5, 6, 7, 8, -100, 9], dtype=np.int32)
    t, want = token_cache.Tokens(flat, 1, 5), [6, 7, 8, -100]
    assert t == want and want == t and t != [6, 7] and t == token_cache.Tokens(flat.copy(), 1, 5)
    assert len(t) == 4 and t[0] == 6 and t[-1] == -100 and type(t[0]) is int and list(t) == want
    assert t[1:] == want[1:] and t[::2] == want[::2] and t[10:] == [] and 8 in t and t.index(8) == 2
    assert t + [1] == want + [1] and [1] + t == [1] + want and repr(t) == repr(want)
    with pytest.raises(IndexError):
        t[4]
    for got in (torch.tensor(t), torch.tensor([t, t]), torch.tensor(np.asarray(t))):
        assert got.dtype == torch.long and got.flatten().tolist() == want * (got.numel() // 4)
    assert pickle.loads(pickle.dumps(t)) == want and type(copy.deepcopy(t)) is list


def test_num_proc_gives_the_features_and_warnings_of_one_process(tiny_model_dir, tmp_path, caplog):
    limit = 91  # the sample's examples are 89-92 tokens long: some are cut, some not
    cfg1, task, rows, tok = setup(tiny_model_dir, tmp_path, token_cache=False, max_seq_length=limit)
    cfg2, *_ = setup(tiny_model_dir, tmp_path, token_cache=False, max_seq_length=limit, num_proc=2)
    logs = []
    for cfg in (cfg1, cfg2):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            logs.append((token_cache.encode_cached(task, rows, tok, cfg, "train", encode_all),
                         [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]))
    assert "tokenized in 2 processes" in caplog.text
    (one, one_log), (two, two_log) = logs
    assert isinstance(two, token_cache.Features) and not isinstance(one, token_cache.Features)
    assert same(one, two) and one_log == two_log and len(one_log) == 1 and f"of {len(rows)} examples" in one_log[0]
    assert 0 < sum(len(f.input_ids) < limit for f in one) < len(one)
    # with the cache: the entry holds the merged warnings; a one-process run hits the entry num_proc=2 wrote
    cached, *_ = setup(tiny_model_dir, tmp_path, max_seq_length=limit, num_proc=2)
    assert same(token_cache.encode_cached(task, rows, tok, cached, "train", encode_all), one)
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()
    assert json.loads((entry / "meta.json").read_text())["warnings"] == one_log
    again, *_ = setup(tiny_model_dir, tmp_path, max_seq_length=limit)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert same(token_cache.encode_cached(task, rows, tok, again, "train", encode_all), one)
    assert "tokenized examples from the cache" in caplog.text
    # an error is the first in row order, as one process reports it
    errors = []
    for n in (1, 2):
        cfg, *_ = setup(tiny_model_dir, tmp_path, token_cache=False, max_seq_length=limit, overlength="error",
                        num_proc=n)
        with pytest.raises(UserError) as err:
            token_cache.encode_cached(task, rows, tok, cfg, "train", encode_all)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "tokens > max_seq_length=91" in errors[0]


def test_merge_warnings_sums_the_chunks_counts():
    chunks = [["a.csv:3: odd", "a.csv: 2 of 10 examples longer than max_seq_length=8 (drop)"],
              ["a.csv: 1 of 11 examples longer than max_seq_length=8 (drop)"], ["a.csv:40: odd"]]
    assert token_cache.merge_warnings(chunks) == ["a.csv:3: odd", "a.csv:40: odd",
                                                  "a.csv: 3 of 21 examples longer than max_seq_length=8 (drop)"]
    assert token_cache.chunk_bounds(5, 8) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert token_cache.chunk_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]


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
