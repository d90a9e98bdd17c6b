"""Confidence tokens: loss only at the token (gathered, never full-sequence logits), tokens through save and load,
the real Mistral tokenizer, `python -m app tag` on real BoolQ rows, validation metrics and reliability files, and a
synthetic task where the token is learnable from the input."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from app import checkpoint as ckpt
from app.__main__ import main
from app.config import load_config
from app.data import Row
from app.errors import UserError
from app.tasks.confidence_tokens.judge import Judged, summarize
from app.tasks.confidence_tokens.qa import all_tokens, domain_tokens, parse_choice, parse_yes_no, raw_qa
from app.tasks.confidence_tokens.sample import synthetic_raw, synthetic_tagged
from app.tasks.confidence_tokens.task import ConfidenceTokens
from app.train import train
from conftest import ALL_LINEAR, ROOT, losses, read_metrics

TINY_CONFIG = ROOT / "configs" / "confidence_tokens_tiny.py"
SAMPLE = ROOT / "data" / "sample" / "confidence"



def ct_args(model_dir: Path, out_dir: Path, **overrides) -> list[str]:
    base = {"model_name": str(model_dir), "create_tiny_model": False, "out_dir": str(out_dir), "tensorboard": False,
            "log_every": 1, "train_file": str(SAMPLE / "train.jsonl")}
    base.update(overrides)
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in base.items()]


def ct_config(model_dir: Path, out_dir: Path, **overrides):
    return load_config(TINY_CONFIG, ct_args(model_dir, out_dir, **overrides))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tagged_rows(n=16) -> list[Row]:
    return [Row(i + 2, r) for i, r in enumerate(synthetic_tagged(n, seed=5))]


# --- parsing and data checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("Yes", "yes"), ("no.", "no"), ("**No**, the passage says otherwise", "no"), ("True", "yes"),
    ("The answer is yes <C_READ>", "yes"), ("</s>", None), ("I cannot tell", None), ("", None),
    ("nobody knows; yes", "yes"),
])
def test_parse_yes_no(text, want):
    assert parse_yes_no(text) == want


OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Insulin", "E": "Metformin"}


@pytest.mark.parametrize("text, want", [
    ("C", "C"), ("(B)", "B"), ("D. Insulin", "D"), ("The answer is E.", "E"), ("Answer: (A) Aspirin", "A"),
    ("A patient like this needs heparin", "B"), ("B - Heparin", "B"), ("the correct option is c", None),
    ("Warfarin or heparin", None), ("F", None), ("", None), ("**C**", "C"), ("I would pick [D]", "D"),
])
def test_parse_choice(text, want):
    assert parse_choice(text, OPTIONS) == want


@pytest.mark.parametrize("values, message", [
    ({"question": "q", "answer": "maybe"}, "raw.jsonl:7: answer must be true or false"),
    ({"question": "", "answer": True}, "raw.jsonl:7: question must be non-empty text"),
    ({"question": "q"}, "raw.jsonl:7: missing answer"),
    ({"question": "q", "options": {"A": "x", "B": "y"}, "answer": "C"}, "raw.jsonl:7: answer 'C' is not one of"),
    ({"question": "q", "options": {"A": "x"}, "answer": "A"}, "raw.jsonl:7: a multiple-choice question needs at least"),
    ({"question": "q", "options": {"Z": "x", "B": "y"}, "answer": "B"}, "raw.jsonl:7: option key 'Z'"),
    ({"question": "q", "options": "A) x", "answer": "A"}, "raw.jsonl:7: options must be"),
    ({"question": "q", "passage": 3, "answer": True}, "raw.jsonl:7: passage must be text"),
])
def test_bad_raw_rows_name_file_and_line(values, message):
    with pytest.raises(UserError) as err:
        raw_qa(values, "boolq", "raw.jsonl", 7)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_raw_row_formats():
    qa = raw_qa({"question": "does it rain", "passage": "It rains.", "answer": False}, "boolq", "f", 1)
    assert (qa.kind, qa.gold) == ("yes_no", "no") and qa.text.startswith("It rains.\n\nQuestion: Does it rain?")
    for values in ({"question": "q?", "options": ["x", "y", "z"], "answer": "B"},
                   {"question": "q?", "options": {"A": "x", "B": "y", "C": "z"}, "answer_idx": "B", "answer": "y"},
                   {"question": "q?", "A": "x", "B": "y", "C": "z", "answer": "y"},
                   {"question": "q?", "options": '{"A": "x", "B": "y", "C": "z"}', "answer": "(b)"}):
        qa = raw_qa(values, "medqa", "f", 1)
        assert (qa.kind, qa.gold, qa.options) == ("choice", "B", {"A": "x", "B": "y", "C": "z"})
        assert qa.text == "q?\nA. x\nB. y\nC. z\nAnswer with the letter of the correct option."


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "tagged_response": "Yes", "dataset": "boolq"}, "t.jsonl:2: tagged_response must end with <C_READ> or <U_READ>"),
    ({"question": "q", "tagged_response": "Yes <C_MED>", "dataset": "boolq"}, "must end with <C_READ> or <U_READ>"),
    ({"question": "q", "tagged_response": "Yes <C_READ> no <U_READ>", "dataset": "boolq"}, "t.jsonl:2: tagged_response holds <C_READ> before"),
    ({"question": "q", "tagged_response": "<C_READ> trailing", "dataset": "boolq"}, "must end with"),
    ({"question": "q", "tagged_response": "Yes <C_READ>", "dataset": "trivia"}, "t.jsonl:2: dataset 'trivia' has no tokens"),
    ({"question": " ", "tagged_response": "Yes <C_READ>", "dataset": "boolq"}, "t.jsonl:2: question must be non-empty"),
    ({"question": "q", "tagged_response": None, "dataset": "boolq"}, "t.jsonl:2: tagged_response must be text"),
])
def test_bad_training_rows_name_file_and_line(tiny_model_dir, tmp_path, row, message):
    task = ConfidenceTokens()
    good = {"question": "ok", "tagged_response": "No <U_READ>", "dataset": "boolq"}
    cfg = ct_config(tiny_model_dir, tmp_path, train_file=str(write_jsonl(tmp_path / "t.jsonl", [good, row])))
    with pytest.raises(UserError) as err:
        task.load_rows(cfg, "train")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_token_config_checks(tiny_model_dir, tmp_path):
    cfg = ct_config(tiny_model_dir, tmp_path)
    for tokens, message in [({"boolq": ["<C>"]}, "need two distinct"), ({"boolq": ["<C>", "<C>"]}, "need two distinct"),
                            ({"a": ["<C>", "<U>"], "b": ["<U>", "<C>"]}, "confident token in one dataset"),
                            ({}, "no datasets configured")]:
        cfg.confidence_tokens = tokens
        with pytest.raises(UserError, match=message):
            domain_tokens(cfg)
    # a new domain is config only; datasets may share a pair
    cfg.confidence_tokens = {"boolq": ["<C_READ>", "<U_READ>"], "trivia": ["<C_TRIV>", "<U_TRIV>"],
                             "medmcqa": ["<C_MED>", "<U_MED>"], "medqa": ["<C_MED>", "<U_MED>"]}
    assert all_tokens(cfg) == ["<C_READ>", "<U_READ>", "<C_TRIV>", "<U_TRIV>", "<C_MED>", "<U_MED>"]


# --- tokens and tokenizers -------------------------------------------------------------------------------------------
def test_mistral_tokenizer_added_tokens_are_single_and_round_trip(mistral_tokenizer_dir, tiny_model_dir, tmp_path):
    task = ConfidenceTokens()
    cfg = ct_config(tiny_model_dir, tmp_path, tokenizer_name=str(mistral_tokenizer_dir), finetuning="full")
    model, tok = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    tokens = all_tokens(cfg)
    ids = tok.convert_tokens_to_ids(tokens)
    assert len(set(ids)) == 4 and min(ids) >= 32000 and model.get_input_embeddings().weight.shape[0] >= len(tok)
    for token, i in zip(tokens, ids):
        assert tok.tokenize(token) == [token]
        assert tok(token, add_special_tokens=False).input_ids == [i]
        assert tok.decode([i]) == token
        assert tok(f"Yes {token}", add_special_tokens=False).input_ids[-1] == i  # not split by the text before it
        assert tok(f"A{token}B", add_special_tokens=False).input_ids.count(i) == 1
    assert set(tokens) <= set(tok.all_special_tokens)
    feature = task.encode(Row(2, {"question": "Is the sky blue?", "tagged_response": "Yes <U_READ>",
                                  "dataset": "boolq"}), tok, cfg)
    assert feature.input_ids[-1] == tok.convert_tokens_to_ids("<U_READ>")
    assert tok.decode(feature.input_ids).endswith("Answer: Yes<U_READ>")
    assert tok.decode(feature.input_ids, skip_special_tokens=True).endswith("Answer: Yes")
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.convert_tokens_to_ids(tokens) == ids and all(again.tokenize(t) == [t] for t in tokens)


def test_new_rows_start_at_the_mean_and_lm_head_rows_are_trainable(tiny_model_dir, tmp_path):
    task = ConfidenceTokens()
    cfg = ct_config(tiny_model_dir, tmp_path, finetuning="lora", target_modules=["q_proj"])
    model, tok = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    ids = tok.convert_tokens_to_ids(all_tokens(cfg))
    base = model.get_base_model()
    for layer in (base.get_input_embeddings(), base.get_output_embeddings()):
        weight = layer.token_adapter.base_layer.weight
        mean = weight[: min(ids)].mean(0)
        assert torch.allclose(weight[ids], mean.expand(len(ids), -1))
        delta = layer.token_adapter.trainable_tokens_delta["default"]
        assert delta.requires_grad and delta.shape == (len(ids), weight.shape[1])


# --- the loss ----------------------------------------------------------------------------------------------------------
def _batch_and_objective(tiny_model_dir, tmp_path, mode):
    task = ConfidenceTokens()
    cfg = ct_config(tiny_model_dir, tmp_path, finetuning="lora", target_modules=ALL_LINEAR, confidence_loss=mode,
                    lora_dropout=0.0)
    torch.manual_seed(0)
    model, tok = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    with torch.no_grad():  # make the token rows differ so that the loss is not symmetric in C and U
        for layer in (model.get_base_model().get_output_embeddings(),):
            delta = layer.token_adapter.trainable_tokens_delta["default"]
            delta.add_(torch.randn_like(delta) * 0.5)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    features = [task.encode(r, tok, cfg) for r in tagged_rows(6)]
    return task, task.objective(model, tok, cfg), features, tok


def _loss_and_grads(objective, batch):
    objective.zero_grad(set_to_none=True)
    loss = objective(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full_vocab", "pair"])
def test_loss_only_at_the_token_positions(tiny_model_dir, tmp_path, mode):
    task, objective, features, tok = _batch_and_objective(tiny_model_dir, tmp_path, mode)
    batch = task.collate(features, tok.pad_token_id)
    assert all(task.loss_items(f) == 1 for f in features)
    loss, grads = _loss_and_grads(objective, batch)
    assert grads and loss > 0

    # any target of an answer or prompt token changed: loss and gradients unchanged, bit for bit
    changed = dict(batch, labels=batch["labels"].clone())
    gen = torch.Generator().manual_seed(1)
    for i, f in enumerate(features):
        n = len(f.input_ids) - 1
        changed["labels"][i, :n] = torch.randint(0, len(tok), (n,), generator=gen)
    loss2, grads2 = _loss_and_grads(objective, changed)
    assert torch.equal(loss, loss2) and grads.keys() == grads2.keys()
    assert all(torch.equal(grads[k], grads2[k]) for k in grads)

    # the token's own target does matter
    flipped = dict(batch, labels=batch["labels"].clone())
    idx, pair = batch["conf_index"], batch["pair"]
    rows = torch.arange(len(features))
    current = flipped["labels"][rows, idx]
    flipped["labels"][rows, idx] = torch.where(current == pair[:, 0], pair[:, 1], pair[:, 0])
    assert not torch.allclose(_loss_and_grads(objective, flipped)[0], loss)

    # equal to cross-entropy on full-sequence logits, taken at the token positions only
    with torch.no_grad():
        logits = objective.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        at = logits[rows, idx - 1].float()
        target = batch["labels"][rows, idx]
        if mode == "pair":
            ref = torch.nn.functional.cross_entropy(at.gather(1, pair), (target == pair[:, 1]).long(), reduction="sum")
        else:
            ref = torch.nn.functional.cross_entropy(at, target, reduction="sum")
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, tmp_path):
    results = []
    for gc in (False, True):
        task = ConfidenceTokens()
        cfg = ct_config(tiny_model_dir, tmp_path, finetuning="lora", target_modules=ALL_LINEAR, lora_dropout=0.0,
                        confidence_loss="full_vocab", gradient_checkpointing=gc)
        torch.manual_seed(0)
        model, tok = task.model_kind(cfg).load(cfg, torch.device("cpu"))
        model.train()
        features = [task.encode(r, tok, cfg) for r in tagged_rows(4)]
        results.append(_loss_and_grads(task.objective(model, tok, cfg), task.collate(features, tok.pad_token_id)))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.allclose(loss0, loss1, rtol=1e-6) and grads0.keys() == grads1.keys()
    assert all(torch.allclose(grads0[k], grads1[k], rtol=1e-4, atol=1e-7) for k in grads0)


@pytest.mark.parametrize("prefill_tokens", [1, 2048])
def test_token_position_logits_apply_the_trainable_token_rows(tiny_model_dir, tmp_path, prefill_tokens):
    """Validation reads the token position through app.lm.generate's prefill (the model's own logits): equal to the
    loss's path (decoder hidden state of each context alone, `project` applying the LM head's trainable token rows)."""
    from app.lm.forward import decoder_and_head
    from app.tasks.confidence_tokens.judge import token_position_logits
    from app.tasks.confidence_tokens.loss import project

    task, objective, features, tok = _batch_and_objective(tiny_model_dir, tmp_path, "full_vocab")
    model = objective.model.eval()
    contexts = [f.input_ids[: len(f.input_ids) - 1 - k] for k, f in enumerate(features)]  # lengths differ
    pairs = [tuple(tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"]))] * len(contexts)
    got = token_position_logits(model, contexts, tok.pad_token_id, 4, "cpu", pairs, prefill_tokens)
    decoder, head = decoder_and_head(model)
    base = head.token_adapter.base_layer
    with torch.no_grad():
        for ctx, pair, (lc, lu, lse) in zip(contexts, pairs, got):
            hidden = decoder(input_ids=torch.tensor([ctx])).last_hidden_state[:, -1]
            logits = project(head, hidden).float()[0]
            want = (float(logits[pair[0]]), float(logits[pair[1]]), float(logits.logsumexp(0)))
            assert (lc, lu, lse) == pytest.approx(want, abs=1e-4)
            # the token rows matter: the base head alone scores the tokens otherwise
            assert abs(float(torch.nn.functional.linear(hidden, base.weight)[0, pair[0]]) - lc) > 1e-3


def test_no_full_sequence_logits(tiny_model_dir, tmp_path, monkeypatch):
    task, objective, features, tok = _batch_and_objective(tiny_model_dir, tmp_path, "full_vocab")
    batch = task.collate(features, tok.pad_token_id)
    vocab = len(tok)
    shapes = []
    real_linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        out = real_linear(x, w, b)
        if out.shape[-1] >= vocab - 4:
            shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    objective(**batch).backward()
    assert shapes and all(s == (len(features), shapes[0][1]) for s in shapes), shapes  # [batch, vocab], never [b, t, v]


# --- training end to end ---------------------------------------------------------------------------------------------
def test_loss_falls_on_the_tiny_sample(tiny_model_dir, tmp_path):
    out = tmp_path / "falls"
    cfg = ct_config(tiny_model_dir, out, validation_files={}, confidence_loss="full_vocab", max_steps=16,
                    batch_size=16, micro_batch_size=16, save_every=1000, learning_rate=4e-3, lr_scheduler="constant",
                    warmup_ratio=0.0)
    assert train(cfg) == 0
    values = losses(out)
    assert len(values) == 16
    assert sum(values[-3:]) / 3 < 0.4 * sum(values[:3]) / 3, values


@pytest.fixture(scope="module")
def boolq_run(tmp_path_factory, tiny_model_dir, shared_fixtures):
    """tag (real BoolQ rows) -> train (LoRA, tiny) -> validate on BoolQ + the MedQA-like sample, once for the module."""
    root = tmp_path_factory.mktemp("boolq")
    boolq = shared_fixtures / "boolq" / "dev_sample.jsonl"
    tagged = root / "train.jsonl"
    overrides = ct_args(tiny_model_dir, root / "run", max_new_tokens=4, max_seq_length=1536, infer_batch_size=25)
    assert main(["tag", str(boolq), "--dataset=boolq", f"--output={tagged}", f"--config={TINY_CONFIG}", *overrides]) == 0
    captured = {}
    original = ConfidenceTokens.objective

    def spy(self, model, tokenizer, cfg):
        captured["model"] = model
        return original(self, model, tokenizer, cfg)

    ConfidenceTokens.objective = spy
    try:
        cfg = load_config(TINY_CONFIG, ct_args(
            tiny_model_dir, root / "run", train_file=str(tagged), finetuning="lora", target_modules=ALL_LINEAR,
            confidence_loss="full_vocab", learning_rate=5e-2, batch_size=8, micro_batch_size=8, max_steps=12,
            eval_every=6, save_every=1000, eval_rows=16, eval_batch_size=16, max_new_tokens=3, max_seq_length=1536,
            validation_files={"boolq": str(boolq), "medqa": str(SAMPLE / "dev_medqa.jsonl")}))
        assert train(cfg) == 0
    finally:
        ConfidenceTokens.objective = original
    return {"root": root, "tagged": tagged, "boolq": boolq, "cfg": cfg, "out": root / "run", "model": captured["model"]}


def test_tag_on_real_boolq_rows(boolq_run):
    raw = [json.loads(l) for l in boolq_run["boolq"].read_text().splitlines() if l.strip()]
    rows = [json.loads(l) for l in boolq_run["tagged"].read_text().splitlines()]
    assert len(rows) == len(raw) == 50
    assert [p.name for p in boolq_run["tagged"].parent.iterdir() if p.name.startswith(".")] == []  # atomic write
    for r, src in zip(rows, raw):
        assert set(r) >= {"question", "tagged_response", "dataset", "answer", "gold", "correct"}
        assert r["dataset"] == "boolq" and r["gold"] == ("Yes" if src["answer"] else "No")
        assert src["passage"][:40] in r["question"] and r["question"].endswith("Answer yes or no.")
        token = "<C_READ>" if r["correct"] else "<U_READ>"
        assert r["tagged_response"].endswith(token)
        assert sum(r["tagged_response"].count(t) for t in ("<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>")) == 1
        assert r["correct"] == (r["answer"] == ("yes" if src["answer"] else "no"))


def test_validation_metrics_per_dataset_reliability_files_and_checkpoints(boolq_run):
    out = boolq_run["out"]
    metrics = read_metrics(out)
    for step in (6, 12):
        m = metrics[step]
        for prefix in ("eval/", "eval/boolq/", "eval/medqa/"):
            for key in ("token_accuracy", "answer_accuracy", "p_confident", "calibration_error", "ece", "brier",
                        "token_emitted", "majority_baseline", "token_nll"):
                assert prefix + key in m, (prefix + key, sorted(m))
                assert math.isfinite(m[prefix + key])
        assert m["eval/boolq/n"] == 8 and m["eval/medqa/n"] == 8  # eval_rows=16 interleaves the two datasets
        assert m["eval/token_accuracy"] == pytest.approx((m["eval/boolq/token_accuracy"] + m["eval/medqa/token_accuracy"]) / 2)
        assert 0.0 <= m["eval/p_confident"] <= 1.0 and "eval/dev_loss" in m
    # 50 tagged rows at batch 8 = 6 steps per epoch: both evaluations end an epoch
    for epoch in (1, 2):
        data = json.loads((out / f"reliability_epoch_{epoch}.json").read_text())
        assert data["step"] == 6 * epoch and set(data["datasets"]) == {"boolq", "medqa"}
        for name in ("boolq", "medqa"):
            rel = data["datasets"][name]["calibration"]["reliability"]
            assert rel["num_samples"] == 8 and sum(b["count"] for b in rel["bins"]) == 8
            assert {"lower", "upper", "count", "mean_confidence", "accuracy"} <= set(rel["bins"][0])
            assert (out / f"reliability_epoch_{epoch}_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"reliability_epoch_{epoch}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = {p.name for p in ckpt.checkpoints_dir(out).iterdir()}
    assert {"best_accuracy", "best_calibration", "final"} <= names
    state = ckpt.read_json(out / "checkpoints" / "final" / "trainer_state.json")
    assert state["best"]["best_accuracy"]["metric"] == "token_accuracy"
    assert state["best"]["best_calibration"]["metric"] == "calibration_error"


def test_tokens_survive_adapter_save_and_load(boolq_run):
    from app.lm.forward import decoder_and_head
    from app.lm.modeling import load_for_inference
    from app.tasks.confidence_tokens.loss import project

    cfg, final = boolq_run["cfg"], boolq_run["out"] / "checkpoints" / "final"
    trained = boolq_run["model"]
    assert (final / "adapter_model.safetensors").is_file()
    task = ConfidenceTokens()
    resumed, tok = task.model_kind(cfg).load(cfg, torch.device("cpu"), final)
    served, tok2 = load_for_inference(final, cfg, torch.device("cpu"))
    ids = tok.convert_tokens_to_ids(all_tokens(cfg))
    assert tok2.convert_tokens_to_ids(all_tokens(cfg)) == ids and all(tok.tokenize(t) == [t] for t in all_tokens(cfg))
    hidden = torch.randn(5, trained.get_base_model().config.hidden_size)
    cols = torch.tensor([ids[:2]] * 5)
    with torch.no_grad():
        want = project(decoder_and_head(trained)[1], hidden, cols)
        emb = trained.get_input_embeddings()(torch.tensor([ids]))
        for model in (resumed, served):
            assert torch.allclose(project(decoder_and_head(model)[1], hidden, cols), want, atol=1e-6)
            assert torch.allclose(model.get_input_embeddings()(torch.tensor([ids])), emb, atol=1e-6)
            assert torch.allclose(decoder_and_head(model)[1](hidden)[:, ids[:2]], want, atol=1e-5)  # peft's own path
        head = decoder_and_head(trained)[1].token_adapter
        moved = head.trainable_tokens_delta["default"] - head.trainable_tokens_original["default"]
        assert moved.abs().max() > 1e-3  # training moved the LM-head rows of the tokens


def test_tag_with_a_trained_checkpoint(boolq_run, tmp_path):
    out = tmp_path / "again.jsonl"
    cfg = boolq_run["cfg"]
    args = ct_args(Path(cfg.model_name), tmp_path, max_new_tokens=3, max_seq_length=1536, infer_batch_size=4)
    assert main(["tag", str(boolq_run["boolq"]), "--dataset=boolq", f"--output={out}", "--limit=4",
                 f"--checkpoint={boolq_run['out'] / 'checkpoints' / 'final'}", f"--config={TINY_CONFIG}", *args]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["tagged_response"].endswith(("<C_READ>", "<U_READ>")) for r in rows)
    assert all(sum(r["tagged_response"].count(t) for t in ("<C_READ>", "<U_READ>")) == 1 for r in rows)


# --- tag: bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lines, args, message", [
    (['{"question": "q", "passage": "p", "answer": true}', '{"question": "q", "answer": "maybe"}'], ["--dataset=boolq"],
     "raw.jsonl:2: answer must be true or false"),
    (['{"question": "q", "answer": true}', '{"question": "q", "answer": tru'], ["--dataset=boolq"],
     "raw.jsonl:2: broken JSON line"),
    (['{"question": "q", "answer": true, "dataset": "trivia"}'], [], "raw.jsonl:1: dataset 'trivia' has no tokens"),
    (['{"question": "q", "answer": true}'], [], "raw.jsonl:1: missing column(s) dataset"),
    (['{"question": "q", "answer": true}'], ["--dataset=trivia"], "--dataset='trivia' has no tokens"),
    (['{"question": "q", "options": {"A": "x", "B": "y"}, "answer": "Q"}'], ["--dataset=medqa"],
     "raw.jsonl:1: answer 'Q' is not one of the option letters A, B"),
    (['{"question": "q", "answer": true}'], ["--dataset=boolq", "--lora_rr=3"], "unknown config key 'lora_rr'"),
])
def test_tag_bad_input_exits_2_with_one_line(tmp_path, capsys, lines, args, message):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    rc = main(["tag", str(raw), f"--output={tmp_path / 'out.jsonl'}", f"--config={TINY_CONFIG}", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "out.jsonl").exists()


# --- a synthetic task: correctness follows from the input ------------------------------------------------------------
def _place_questions(n: int, seed: int) -> list[dict]:
    """BoolQ-shaped rows "is the <place> indoors", gold answer from app.tasks.nli_cot.sample.PLACES."""
    rows = synthetic_raw("boolq", n, seed, claims=("indoors",))
    for row in rows:
        del row["passage"]
        row["question"] = f"is the {row['place']} indoors"
    return rows


def _answerer(tiny_model_dir: Path, out: Path, cfg) -> Path:
    """The tiny model taught (plain loop, full fine-tuning) to answer "yes" to every question, then EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.lm.forward import CompletionLoss
    from app.tasks.confidence_tokens.qa import answer_ids, prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = _place_questions(64, seed=3)
    feats = []
    for i, values in enumerate(rows):
        qa = raw_qa(values, "boolq", "x", i)
        p, a = prompt_ids(qa.text, tok, cfg), answer_ids("yes", tok, cfg) + [tok.eos_token_id]
        feats.append((p + a, [-100] * len(p) + a))
    loss_fn = CompletionLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        chunk = feats[(step * 16) % 64: (step * 16) % 64 + 16]
        width = max(len(x) for x, _ in chunk)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in chunk])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
        (loss_fn(ids, mask, labels) / (labels[:, 1:] != -100).sum()).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_synthetic_task_token_accuracy_clearly_above_majority(tiny_model_dir, tmp_path):
    """The answerer always says yes; the gold answer is yes exactly when the place is indoors, so whether the answer
    is correct (and so the token) follows from one word of the input. tag -> train -> validate."""
    base_cfg = ct_config(tiny_model_dir, tmp_path)
    answerer = _answerer(tiny_model_dir, tmp_path / "answerer", base_cfg)
    raw_train = write_jsonl(tmp_path / "raw_train.jsonl", _place_questions(192, seed=31))
    raw_dev = write_jsonl(tmp_path / "raw_dev.jsonl", _place_questions(48, seed=32))
    tagged = tmp_path / "tagged.jsonl"
    args = ct_args(answerer, tmp_path / "run", max_new_tokens=4)
    assert main(["tag", str(raw_train), "--dataset=boolq", f"--output={tagged}", f"--config={TINY_CONFIG}", *args]) == 0
    rows = [json.loads(l) for l in tagged.read_text().splitlines()]
    assert sum(r["answer"] == "yes" for r in rows) >= 0.9 * len(rows)  # the answerer answers
    assert 0.3 < sum(r["correct"] for r in rows) / len(rows) < 0.7
    cfg = load_config(TINY_CONFIG, ct_args(
        answerer, tmp_path / "run", train_file=str(tagged), validation_files={"boolq": str(raw_dev)},
        finetuning="full", confidence_loss="pair", learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
        batch_size=16, micro_batch_size=16, max_steps=60, eval_every=60, save_every=1000, max_new_tokens=4))
    assert train(cfg) == 0
    final = read_metrics(tmp_path / "run")[60]
    assert final["eval/answer_accuracy"] == pytest.approx(sum(v["answer"] for v in map(json.loads, raw_dev.read_text().splitlines())) / 48, abs=0.1)
    assert final["eval/token_accuracy"] >= final["eval/majority_baseline"] + 0.2, final


# --- calibration edge cases, hub push --------------------------------------------------------------------------------
def _judged(correct, p):
    return [Judged("boolq", "yes", "yes" if c else "no", "", bool(c), "<C_READ>" if c else "<U_READ>", None,
                   "<C_READ>" if q >= 0.5 else "<U_READ>", q, 0.5) for c, q in zip(correct, p)]


@pytest.mark.parametrize("correct, p", [([1, 1, 1], [0.9, 0.8, 0.7]), ([0, 0], [0.5, 0.5]), ([1], [1.0]),
                                        ([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]), ([1, 0, 1], [0.0, 1.0, 0.5])])
def test_summaries_of_degenerate_evaluations(tiny_model_dir, tmp_path, correct, p):
    cfg = ct_config(tiny_model_dir, tmp_path, calib_beta=50)  # more than the samples: one bin
    metrics, report = summarize(_judged(correct, p), cfg)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["majority_baseline"] >= 0.5 and report["num_samples"] == len(p)


def test_hub_push_only_for_final_and_never_fatal(tiny_model_dir, tmp_path, monkeypatch, caplog):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo, private, exist_ok):
            calls.append(("create", repo, private))

        def upload_folder(self, folder_path, repo_id, allow_patterns, commit_message):
            if repo_id == "me/broken":
                raise RuntimeError("403 forbidden")
            calls.append(("upload", Path(folder_path).name, repo_id, tuple(allow_patterns)))

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FakeApi))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    task = ConfidenceTokens()
    cfg = ct_config(tiny_model_dir, tmp_path / "run", hub_repo="me/conf")
    with pytest.raises(UserError, match="hub_repo='me/conf' needs a Hugging Face token"):
        task.load_rows(cfg, "train")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    task.load_rows(cfg, "train")
    task.on_train_end(cfg.model_copy(update={"hub_repo": None}), ckpt.checkpoints_dir(cfg.out_dir) / "final")
    assert calls == []
    task.on_train_end(cfg, ckpt.checkpoints_dir(cfg.out_dir) / "final")
    assert calls[0] == ("token", "hf_secret") and calls[1] == ("create", "me/conf", True)
    assert calls[2][:3] == ("upload", "final", "me/conf") and "adapter_model.safetensors" in calls[2][3]
    cfg.hub_repo = "me/broken"
    task.on_train_end(cfg, ckpt.checkpoints_dir(cfg.out_dir) / "final")  # logged, not raised
    assert "push to the Hub repo me/broken failed (RuntimeError: 403 forbidden)" in caplog.text
    assert "hf_secret" not in caplog.text


# --- data plumbing ---------------------------------------------------------------------------------------------------
def test_validation_rows_interleave_datasets_and_dev_loss_rows(tiny_model_dir, tmp_path):
    task = ConfidenceTokens()
    cfg = ct_config(tiny_model_dir, tmp_path)
    rows = task.load_rows(cfg, "dev")
    assert len(rows) == 96 and [r.values["dataset"] for r in rows[:4]] == ["boolq", "medqa", "boolq", "medqa"]
    from app.lm.modeling import load_tokenizer

    tok = load_tokenizer(cfg)
    tok.add_special_tokens({"additional_special_tokens": all_tokens(cfg)}, replace_extra_special_tokens=False)
    for row in rows[:4]:
        f = task.encode(row, tok, cfg)
        want = domain_tokens(cfg)[row.values["dataset"]][0 if row.line % 2 else 1]
        assert f.input_ids[-1] == tok.convert_tokens_to_ids(want) and f.labels[-1] == f.input_ids[-1]
    # a single dev_file with a dataset column works too
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"dataset": "boolq", "question": "q", "answer": True},
                                                   {"dataset": "medqa", "question": "q", "options": ["a", "b"], "answer": "A"}])
    cfg.validation_files, cfg.dev_file = {}, str(mixed)
    assert [r.values["_qa"].kind for r in task.load_rows(cfg, "dev")] == ["yes_no", "choice"]
    cfg.validation_files = {"trivia": str(mixed)}
    with pytest.raises(UserError, match="validation_files: dataset 'trivia' has no tokens"):
        task.load_rows(cfg, "dev")


def test_truncation_keeps_the_answer_and_the_token_last(tiny_model_dir, tmp_path, shared_fixtures):
    from app.lm.modeling import load_tokenizer
    from app.engine.loop import encode_all

    task = ConfidenceTokens()
    cfg = ct_config(tiny_model_dir, tmp_path, max_seq_length=64, overlength="truncate")
    tok = load_tokenizer(cfg)
    tok.add_special_tokens({"additional_special_tokens": all_tokens(cfg)}, replace_extra_special_tokens=False)
    raw = [json.loads(l) for l in (shared_fixtures / "boolq" / "dev_sample.jsonl").read_text().splitlines()[:5]]
    rows = [Row(i + 1, {"question": raw_qa(r, "boolq", "f", 1).text, "tagged_response": "No, it is not <U_READ>",
                        "dataset": "boolq"}) for i, r in enumerate(raw)]
    task.validate("f", rows, cfg)
    features = encode_all(task, rows, tok, cfg, "f")
    assert len(features) == 5
    u = tok.convert_tokens_to_ids("<U_READ>")
    for f in features:
        assert len(f.input_ids) == 64 and f.input_ids[-1] == u and f.labels[-1] == u
        assert tok.decode(f.input_ids, skip_special_tokens=True).endswith("Answer yes or no.\nAnswer: No, it is not")
    batch = task.collate(features, tok.pad_token_id)
    assert batch["conf_index"].tolist() == [63] * 5 and batch["pair"].shape == (5, 2)
