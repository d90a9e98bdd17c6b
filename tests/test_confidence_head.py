"""The confidence_head task on the tiny model: marker positions (tiny and real Mistral tokenizers), batching,
truncation, full and LoRA training, checkpoint round trips, the strict head check and the score-steps command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import ALL_LINEAR, ROOT, losses, read_metrics

from app.config import load_config
from app.data import Row
from app.errors import UserError
from app.lm.forward import last_hidden_states
from app.tasks.confidence_head.step_data import read_step_file
from app.tasks.confidence_head.model import HEAD_FILE, collate_steps, encode_steps, load_head, score_features
from app.tasks.confidence_head.task import ConfidenceHead
from app.train import train

CPU = torch.device("cpu")
DEV = ROOT / "data/sample/steps/dev.jsonl"



def ch_config(model_dir: Path, out_dir: Path, **overrides):
    values = {"model_name": str(model_dir), "create_tiny_model": False, "out_dir": str(out_dir),
              "train_file": str(ROOT / "data/sample/steps/train.jsonl"), "dev_file": str(DEV), "tensorboard": False,
              "log_every": 1, "save_every": 1000}
    values.update(overrides)
    args = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in values.items()]
    return load_config(ROOT / "configs/confidence_head_tiny.py", args)


def trained(cfg) -> dict:
    """Train in-process; the objective (backbone + head) as training left it."""
    captured = {}
    original = ConfidenceHead.objective

    def spy(self, model, tokenizer, cfg_):
        captured["objective"] = original(self, model, tokenizer, cfg_)
        captured["task"] = self
        return captured["objective"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConfidenceHead, "objective", spy)
        assert train(cfg) == 0
    return {"cfg": cfg, "out": Path(cfg.out_dir), "final": Path(cfg.out_dir) / "checkpoints/final", **captured}


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ch") / "full"
    return trained(ch_config(tiny_model_dir, out, max_steps=40, eval_every=40, batch_size=16, micro_batch_size=16))


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ch") / "lora"
    return trained(ch_config(tiny_model_dir, out, finetuning="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules=ALL_LINEAR, learning_rate=2e-3, max_steps=32, eval_every=32,
                             batch_size=16, micro_batch_size=16))


def dev_rows(n: int = 24) -> list[Row]:
    return read_step_file(DEV)[:n]


def scores_of(objective, tokenizer, rows, batch_size: int, max_len: int = 256) -> list[list]:
    objective.eval()
    feats = [encode_steps(r.values["problem"], r.values["steps"], r.values["labels"], tokenizer, "<CONFIDENCE>",
                          max_len) for r in rows]
    out: list = [None] * len(rows)
    for batch, res in score_features(objective, feats, tokenizer.pad_token_id, CPU, batch_size):
        for i, s in zip(batch, res):
            out[i] = s
    return out


# --- positions ----------------------------------------------------------------------------------------------------
EXAMPLES = [
    ("Calculate 2+2.", ["Add the numbers together.", "The result is 4."], [1.0, 1.0]),
    ("Where is Anna reading?", ["Anna is reading in the park. They agree.", "So she is outdoors, 3 > 2 ✓",
                                "Hence: park."], [1.0, None, 0.0]),
    ("Short?", ["Yes."], [0.5]),
]


def check_marker_positions(tokenizer, objective) -> None:
    """Markers sit right after their steps; the head's input rows are the final hidden states at exactly those
    positions (padding in a batch included), and the LM head never runs."""
    mid = tokenizer.convert_tokens_to_ids("<CONFIDENCE>")
    feats = [encode_steps(p, s, y, tokenizer, "<CONFIDENCE>", None) for p, s, y in EXAMPLES]
    expected = []
    for f, (problem, steps, _) in zip(feats, EXAMPLES):
        positions = [i for i, t in enumerate(f.input_ids) if t == mid]
        assert len(positions) == len(steps)
        assert [i for i, k in enumerate(f.labels) if k != -100] == positions
        assert [f.labels[p] for p in positions] == list(range(len(steps)))
        starts = [0] + [p + 1 for p in positions[:-1]]
        for k, (a, p) in enumerate(zip(starts, positions)):
            text = tokenizer.decode(f.input_ids[a:p])
            assert f"Step {k + 1}: {steps[k]}" in text and text.rstrip().endswith(steps[k])
        assert problem in tokenizer.decode(f.input_ids[: positions[0]])
        expected.append(positions)

    batch = collate_steps(feats, tokenizer.pad_token_id)
    seen = []
    hook = objective.head.net[0].register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    lm_head = objective.model.get_output_embeddings()
    guard = lm_head.register_forward_hook(lambda *a: pytest.fail("the LM head was computed"))
    try:
        objective.eval()
        objective(**batch)
    finally:
        hook.remove()
        guard.remove()
    with torch.no_grad():
        hidden = last_hidden_states(objective.model, batch["input_ids"], batch["attention_mask"])
    want = torch.stack([hidden[i, p] for i, positions in enumerate(expected) for p in positions])
    assert seen[0].shape == want.shape
    assert torch.equal(seen[0], want)


def test_positions_tiny_tokenizer(tiny_model_dir, tmp_path):
    task = ConfidenceHead()
    cfg = ch_config(tiny_model_dir, tmp_path)
    model, tokenizer = task.model_kind(cfg).load(cfg, CPU)
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "<CONFIDENCE>"
    check_marker_positions(tokenizer, task.objective(model, tokenizer, cfg))


def test_positions_real_mistral_tokenizer(mistral_tokenizer_dir, tiny_model_dir, tmp_path):
    from app.lm.modeling import fit_embeddings, load_tokenizer
    from app.lm.tiny import build_model

    cfg = ch_config(tiny_model_dir, tmp_path, tokenizer_name=str(mistral_tokenizer_dir))
    tokenizer = load_tokenizer(cfg)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<CONFIDENCE>"]}, replace_extra_special_tokens=False)
    model = build_model(vocab_size=32000)
    fit_embeddings(model, tokenizer)
    check_marker_positions(tokenizer, ConfidenceHead().objective(model, tokenizer, cfg))


# --- batching, truncation, loss -----------------------------------------------------------------------------------
def test_batched_scores_equal_one_at_a_time(full_run):
    task = full_run["task"]
    objective = full_run["objective"]
    tokenizer = task.model_kind(full_run["cfg"]).load(full_run["cfg"], CPU)[1]  # the same tokenizer the run used
    rows = dev_rows(16)
    assert len({len(r.values["steps"]) for r in rows}) > 1
    batched, single = scores_of(objective, tokenizer, rows, 16), scores_of(objective, tokenizer, rows, 1)
    for b, s in zip(batched, single):
        assert len(b) == len(s) and max(abs(x - y) for x, y in zip(b, s)) < 1e-5
    assert not objective.head.training  # the head follows the backbone into eval mode (no dropout)


def test_truncation_drops_cut_steps_instead_of_shifting_labels(tiny_model_dir, tmp_path):
    task = ConfidenceHead()
    cfg = ch_config(tiny_model_dir, tmp_path)
    model, tok = task.model_kind(cfg).load(cfg, CPU)
    objective = task.objective(model, tok, cfg).eval()
    steps = ["Anna is reading in the park.", "They agree.", "Anna is cooking in the kitchen today.", "They differ."]
    labels = [0.1, 0.9, 0.3, 0.7]
    full = encode_steps("Where is Anna?", steps, labels, tok, "<CONFIDENCE>", None)
    marks = [i for i, k in enumerate(full.labels) if k != -100]
    cut_at = marks[2] - 3  # inside the third step: its marker and the fourth step are gone
    row = Row(5, {"problem": "Where is Anna?", "steps": steps, "labels": labels, "source": "x.jsonl"})
    short = task.truncate(task.encode(row, tok, ch_config(tiny_model_dir, tmp_path, max_seq_length=cut_at)), cut_at)
    assert len(short.input_ids) == cut_at and short.input_ids == full.input_ids[:cut_at]
    assert [i for i, k in enumerate(short.labels) if k != -100] == marks[:2]
    assert task.loss_items(short) == 2 and task.loss_items(full) == 4
    batch = collate_steps([short], tok.pad_token_id)
    assert batch["targets"][batch["target_mask"]].tolist() == pytest.approx([0.1, 0.9])
    # the kept steps score as in the whole text (causal model): nothing moved onto another marker
    s_full = scores_of(objective, tok, [Row(1, {**row.values})], 1)[0]
    s_short = scores_of(objective, tok, [Row(1, {**row.values})], 1, max_len=cut_at)[0]
    assert s_short[2:] == [None, None] and s_short[:2] == pytest.approx(s_full[:2], abs=1e-6)
    with pytest.raises(UserError):  # the engine's other overlength choices still apply to whole examples
        from app.engine.loop import encode_all

        encode_all(task, [row], tok, ch_config(tiny_model_dir, tmp_path, max_seq_length=cut_at, overlength="error"), "x")


def test_huber_loss_and_unlabelled_steps(tiny_model_dir, tmp_path):
    task = ConfidenceHead()
    cfg = ch_config(tiny_model_dir, tmp_path, head_loss="huber", head_huber_delta=0.25)
    model, tok = task.model_kind(cfg).load(cfg, CPU)
    objective = task.objective(model, tok, cfg).eval()
    feats = [encode_steps(p, s, y, tok, "<CONFIDENCE>", None) for p, s, y in EXAMPLES]
    batch = collate_steps(feats, tok.pad_token_id)
    pred = objective.scores(batch["input_ids"], batch["attention_mask"], batch["positions"], batch["step_mask"])
    keep = batch["target_mask"]
    assert keep.sum() == sum(task.loss_items(f) for f in feats) == 5  # the null label carries no loss
    want = F.huber_loss(pred[keep], batch["targets"][keep], delta=0.25, reduction="sum")
    assert float(objective(**batch)) == pytest.approx(float(want), rel=1e-6)
    objective.loss = "mse"
    assert float(objective(**batch)) == pytest.approx(float(((pred[keep] - batch["targets"][keep]) ** 2).sum()), rel=1e-6)


# --- full fine-tuning ---------------------------------------------------------------------------------------------
def test_full_finetuning_learns_the_synthetic_task(full_run, tiny_model_dir):
    values = losses(full_run["out"])
    assert len(values) == 40 and sum(values[-5:]) / 5 < 0.3 * sum(values[:5]) / 5, values
    final_eval = read_metrics(full_run["out"])[40]
    assert final_eval["eval/auroc"] >= 0.9, final_eval
    assert final_eval["eval/dev_loss"] == pytest.approx(final_eval["eval/mse"], rel=1e-5)

    ckpt = full_run["final"]
    for name in ("model.safetensors", HEAD_FILE, "run_config.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    original, final = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert set(final) == set(original)
    for k in original:
        if k == "lm_head.weight":  # never computed, so frozen
            assert torch.equal(final[k][: original[k].shape[0]], original[k])
        elif "embed_tokens" in k:
            assert final[k].shape[0] == original[k].shape[0] + 1
            assert not torch.equal(final[k][-1], original[k].mean(0))  # the marker's row trained from the mean
        else:
            assert not torch.equal(final[k], original[k]), k
    head = load_file(str(ckpt / HEAD_FILE))
    live = full_run["objective"].head.state_dict()
    assert set(head) == set(live) and all(torch.equal(head[k], live[k]) for k in head)
    assert [tuple(head[f"net.{i}.weight"].shape) for i in (0, 3, 6)] == [(1024, 96), (256, 1024), (1, 256)]


def test_full_checkpoint_round_trip_gives_identical_scores(full_run):
    from app.tasks.confidence_head.score_steps import load_scorer

    rows = dev_rows(12)
    objective, tokenizer = load_scorer(full_run["final"], full_run["cfg"], CPU)
    live = full_run["objective"]
    assert scores_of(objective, tokenizer, rows, 4) == scores_of(live, tokenizer, rows, 4)


def test_head_loads_with_strict_key_check(full_run, tmp_path):
    from app.tasks.confidence_head.model import ConfidenceMLP

    state = load_file(str(full_run["final"] / HEAD_FILE))
    head = ConfidenceMLP(96)
    load_head(head, full_run["final"])
    (tmp_path / "missing").mkdir()
    save_file({k: v for k, v in state.items() if k != "net.6.bias"}, str(tmp_path / "missing" / HEAD_FILE))
    with pytest.raises(UserError, match=r"missing: \['net\.6\.bias'\]; unexpected: none"):
        load_head(head, tmp_path / "missing")
    (tmp_path / "extra").mkdir()
    save_file({**state, "net.9.weight": torch.zeros(1)}, str(tmp_path / "extra" / HEAD_FILE))
    with pytest.raises(UserError, match=r"unexpected: \['net\.9\.weight'\]"):
        load_head(head, tmp_path / "extra")
    with pytest.raises(UserError, match="has shape"):
        load_head(ConfidenceMLP(96, (512, 256)), full_run["final"])
    with pytest.raises(UserError, match="missing"):
        load_head(head, tmp_path)


# --- LoRA ---------------------------------------------------------------------------------------------------------
def test_lora_trains_adapter_marker_row_and_head(lora_run, tiny_model_dir):
    values = losses(lora_run["out"])
    assert len(values) == 32 and sum(values[-5:]) / 5 < 0.6 * sum(values[:5]) / 5, values
    ckpt = lora_run["final"]
    for name in ("adapter_model.safetensors", "adapter_config.json", HEAD_FILE, "run_config.json"):
        assert (ckpt / name).is_file(), name
    assert not (ckpt / "model.safetensors").exists()
    model = lora_run["objective"].model
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    base = {n.replace(".base_layer", "").replace(".token_adapter", ""): p
            for n, p in model.get_base_model().named_parameters() if "lora_" not in n and "trainable_tokens" not in n}
    assert set(base) == set(original)
    for k, v in original.items():  # the base is bitwise untouched (the marker row trains in the adapter)
        assert torch.equal(base[k][: v.shape[0]], v) and not base[k].requires_grad, k
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    marker_rows = [v for k, v in adapter.items() if "trainable_tokens" in k]
    assert marker_rows and marker_rows[0].shape == (1, 96)
    assert not torch.equal(marker_rows[0][0], original["model.embed_tokens.weight"].mean(0))  # trained from the mean
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    head = load_file(str(ckpt / HEAD_FILE))
    fresh = ConfidenceHead().objective(model, None, lora_run["cfg"]).head.state_dict()  # same shapes, new init
    assert set(head) == set(fresh) and any(not torch.equal(head[k], fresh[k]) for k in head)


def test_lora_checkpoint_round_trip_gives_identical_scores(lora_run):
    from app.tasks.confidence_head.score_steps import load_scorer

    rows = dev_rows(12)
    objective, tokenizer = load_scorer(lora_run["final"], lora_run["cfg"], CPU)
    assert scores_of(objective, tokenizer, rows, 4) == scores_of(lora_run["objective"], tokenizer, rows, 4)


# --- the scoring command ------------------------------------------------------------------------------------------
def test_score_steps_command(full_run, tmp_path, capsys):
    from app.__main__ import main
    from app.runs import PartialFile, checkpoint_config, fingerprint
    from app.tasks.confidence_head.metrics import step_metrics

    records = [json.loads(line) for line in DEV.read_text().splitlines()[:10]]
    records[3] = {"problem": records[3]["problem"], "steps": records[3]["steps"], "id": "no-labels"}
    records[6]["steps"] = records[6]["steps"] * 12  # longer than max_seq_length: its late steps are cut
    records[6]["labels"] = records[6]["labels"] * 12
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 1 else "") for i, r in enumerate(records)))
    out = tmp_path / "out" / "scores.jsonl"
    args = ["score-steps", str(src), "--checkpoint", str(full_run["final"]), "--output", str(out),
            "--infer_batch_size=4", "--max_seq_length=160"]
    assert main(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(10))
    assert [r["line"] for r in lines] == [1, 2] + list(range(4, 12))  # the blank line 3 is skipped
    assert [len(r["scores"]) for r in lines] == [len(r["steps"]) for r in records]
    assert lines[3]["id"] == "no-labels" and "id" not in lines[0]
    cut = lines[6]["scores"]
    assert cut[0] is not None and cut[-1] is None and all(0 <= s <= 1 for s in cut if s is not None)
    assert not (tmp_path / "out" / "scores.jsonl.partial.jsonl").exists()

    # same scores as the trained objective in memory, other batches notwithstanding
    task = full_run["task"]
    tokenizer = task.model_kind(full_run["cfg"]).load(full_run["cfg"], CPU)[1]
    rows = read_step_file(src, require_labels=False)
    want = scores_of(full_run["objective"], tokenizer, rows, 1, max_len=160)
    for got, exp in zip(lines, want):
        assert [g is None for g in got["scores"]] == [e is None for e in exp]
        assert all(abs(g - e) < 1e-5 for g, e in zip(got["scores"], exp) if g is not None)
    summary = json.loads((tmp_path / "out" / "scores.metrics.json").read_text())
    pairs = [(s, y) for r, rec in zip(lines, records) for s, y in zip(r["scores"], rec.get("labels") or [])
             if s is not None and y is not None]
    assert summary["labelled_steps"] == len(pairs) and summary["steps_cut"] == sum(s is None for s in cut)
    ref = step_metrics([s for s, _ in pairs], [y for _, y in pairs])
    for key in ("mse", "mae", "pearson", "spearman", "auroc", "ece"):
        assert summary["metrics"][key] == pytest.approx(ref[key], abs=1e-6)
    assert "auroc=" in capsys.readouterr().out

    # resume: batches already in the partial file are kept, the rest is scored
    cfg = checkpoint_config(full_run["final"], ["--infer_batch_size=4", "--max_seq_length=160"])
    partial = PartialFile(out.with_name("scores.jsonl.partial.jsonl"), fingerprint(src, full_run["final"], cfg), 10)
    partial.add([{"i": 0, "scores": [0.25] * len(records[0]["steps"])}])
    partial.close()
    assert main(args) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[0]["scores"] == [0.25] * len(records[0]["steps"]) and again[1:] == lines[1:]


def test_score_steps_refuses_other_formats_and_tasks(full_run, tmp_path, shared_fixtures, capsys):
    from app.__main__ import main

    prm = shared_fixtures / "prm800k" / "samples.jsonl"
    assert main(["score-steps", str(prm), "--checkpoint", str(full_run["final"])]) == 2
    assert "prm800k records" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "p", "steps": ["a", "b"], "labels": [1, 3]}) + "\n")
    assert main(["score-steps", str(bad), "--checkpoint", str(full_run["final"])]) == 2
    assert f"{bad}:1: labels[1] = 3 is outside [0, 1]" in capsys.readouterr().err


# --- resume and processes -----------------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_the_same_weights_and_head(full_run, tiny_model_dir, tmp_path):
    cfg = ch_config(tiny_model_dir, tmp_path / "resumed", max_steps=40, eval_every=40, batch_size=16,
                    micro_batch_size=16, stop_after_steps=20)
    assert train(cfg) == 0
    assert (tmp_path / "resumed/checkpoints/step_0000020" / HEAD_FILE).is_file()
    assert not (tmp_path / "resumed/checkpoints/final").exists()
    assert train(cfg) == 0  # picks up at step 20: head weights come back through load_extra
    for name in (HEAD_FILE, "model.safetensors"):
        a = load_file(str(tmp_path / "resumed/checkpoints/final" / name))
        b = load_file(str(full_run["final"] / name))
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), name


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_model_dir, tmp_path):
    """DDP over the objective (backbone + head): the LM head, never computed, is frozen, so no parameter waits for a
    gradient; with head dropout off, 2 gloo processes give the steps of 1 process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = dict(max_steps=3, eval_every=100, batch_size=16, micro_batch_size=8, head_dropout=0.0)
    one = ch_config(tiny_model_dir, tmp_path / "one", **common)
    assert train(one) == 0
    args = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in {
        "model_name": str(tiny_model_dir), "create_tiny_model": False, "out_dir": str(tmp_path / "two"),
        "train_file": str(ROOT / "data/sample/steps/train.jsonl"), "dev_file": None, "tensorboard": False,
        "log_every": 1, "save_every": 1000, **common}.items()]
    load_config(ROOT / "configs/confidence_head_tiny.py", args)  # valid before launching
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "app",
           "train", str(ROOT / "configs/confidence_head_tiny.py"), *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a = load_file(str(tmp_path / "one/checkpoints/final" / HEAD_FILE))
    b = load_file(str(tmp_path / "two/checkpoints/final" / HEAD_FILE))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
