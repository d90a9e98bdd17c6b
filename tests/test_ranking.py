"""The ranking task: the FinQA executor (fixture and edge programs), candidate pools, reward tiers, the data pipeline
commands, pooling and padding, batch-size invariance, shared prefix = flattened (scores and gradients), learning the
synthetic set, exact resume, the score head's strict load, LoRA round trip, the rank command and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_app

from app.config import load_config
from app.train import train
from app.errors import UserError
from app.tasks.protocol import Feature
from app.tasks.ranking import candidates as cand
from app.tasks.ranking.finqa import execute, prepare_records, same_answer
from app.tasks.ranking.model import HEAD_FILE, RankingObjective, ScoreHead, listwise_loss, load_head
from app.tasks.ranking.rewards import reward
from app.tasks.ranking.task import Ranking, collate_ranking, feature_of

SAMPLE = ROOT / "data/sample/ranking"


def rk_config(model_dir: Path | None, out_dir: Path, **overrides):
    values = {"out_dir": str(out_dir), "tensorboard": False, "log_every": 1, "save_every": 1000,
              "train_file": str(SAMPLE / "train.jsonl"), "dev_file": str(SAMPLE / "dev.jsonl")}
    if model_dir is not None:
        values.update(model_name=str(model_dir), create_tiny_model=False)
    values.update(overrides)
    args = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in values.items()]
    return load_config(ROOT / "configs/ranking_tiny.py", args)


# --- the executor -------------------------------------------------------------------------------------------------
def test_executor_reproduces_every_fixture_answer(shared_fixtures):
    path = shared_fixtures / "finqa" / "train_sample.json"
    records = json.loads(path.read_text())
    assert len(records) == 20
    for rec in records:
        got = execute(rec["qa"]["program"], rec["table"])
        assert same_answer(got, rec["qa"]["exe_ans"]), (rec["qa"]["program"], got, rec["qa"]["exe_ans"])
    rows, stats = prepare_records(path)
    assert stats["gold_executed"] == stats["gold_programs"] == 20 and not stats["problems"]
    assert all(r["question"] and r["context"] for r in rows)


TABLE = [["", "2019", "2018"], ["net sales", "$ 1,200", "$ 800 ( 12 )"], ["margin", "10%", "5%"],
         ["bad", "n/a", "3"]]


@pytest.mark.parametrize("program, expected", [
    ("add(1, 2)", 3.0),
    ("subtract(5, 7.5)", -2.5),
    ("multiply(3, const_m1)", -3.0),
    ("divide(1, 3)", 0.33333),                          # rounded to 5 decimals
    ("divide(2, 3)", 0.66667),
    ("add(1,200, 0)", 1200.0),                          # steps split at ", ": "1,200" is one number
    ("add(1200, 12%)", 1200.12),                        # percentages are fractions
    ("exp(2, 10)", 1024.0),
    ("subtract(10, 4), divide(#0, 4), multiply(#1, const_100)", 150.0),
    ("greater(5, 3)", "yes"),
    ("greater(3, 5)", "no"),
    ("greater(3, 3)", "no"),
    ("table_sum(net sales, none)", 2000.0),             # "$" dropped, "(12)" cut, thousands separators
    ("table_average(net sales, none)", 1000.0),
    ("table_max(margin, none)", 0.1),
    ("table_min(margin, none)", 0.05),
    ("table_sum(bad, none)", None),                     # a cell that is no number
    ("table_sum(missing row, none)", None),
    ("divide(1, 0)", None),                             # division by zero: invalid, as in the official code
    ("add(#3, 1)", None),                               # a reference to a step that does not exist
    ("sqrt(4, none)", None),                            # not an op
    ("add(1, 2", None),                                 # not closed
    ("add(1, 2), greater(#0, 2), add(#1, 1)", None),    # arithmetic on yes/no
    ("add(const_1000, const_100)", 1100.0),
    ("add(a, 1)", None),
    ("", None),
])
def test_executor_edge_programs(program, expected):
    got = execute(program, TABLE)
    assert got == expected, (program, got)


# --- candidates and rewards ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(shared_fixtures):
    rows, _ = prepare_records(shared_fixtures / "finqa" / "train_sample.json")
    return rows


def test_candidates_are_deterministic_shuffled_and_distinct(prepared, tmp_path):
    cfg = rk_config(None, tmp_path)
    pools = cand.add_candidates(prepared, cfg)
    again = cand.add_candidates(prepared, cfg)
    assert pools == again
    gold_at = []
    for row in pools:
        c = row["candidates"]
        assert len(c) == 8
        assert [x["kind"] for x in c].count("gold") == 1
        assert len({x["text"] for x in c}) == 8
        gold_at.append(next(k for k, x in enumerate(c) if x["kind"] == "gold"))
        for x in c:  # every candidate's answer is what its program executes to
            if x["program"] is not None and x["kind"] not in ("unparseable", "other_question"):
                assert execute(x["program"], row["table"]) == x["answer"]
            if x["kind"] == "unparseable":
                assert x["answer"] is None
    assert len(set(gold_at)) >= 4  # shuffled: the gold is not always in one place
    kinds = {x["kind"] for row in pools for x in row["candidates"]}
    assert {"numeric", "operation", "argument", "scale", "other_question", "unparseable"} <= kinds
    other = cand.add_candidates(prepared, rk_config(None, tmp_path, seed=7))
    assert [r["candidates"] for r in other] != [r["candidates"] for r in pools]
    # a question's pool does not depend on the rows around it beyond other_question draws
    assert cand.make_candidates(prepared[3], prepared, cfg) == pools[3]["candidates"]


def test_corruption_rate_zero_restates_the_gold(prepared, tmp_path):
    cfg = rk_config(None, tmp_path, corruption_rate=0.0)
    row = cand.add_candidates(prepared[:2], cfg)[0]
    restated = [x for x in row["candidates"] if x["kind"] == "restated"]
    assert restated and all(same_answer(x["answer"], prepared[0]["gold_answer"]) for x in restated)


def test_reward_tiers():
    tiers = [[0.01, 0.5], [0.05, 0.25], [0.2, 0.1]]
    assert reward(0.34719, 0.34719, tiers) == 1.0
    assert reward(0.347194, 0.34719, tiers) == 1.0          # equal at 5 decimals
    assert reward(100.5, 100.0, tiers) == 0.5               # 0.5% off
    assert reward(103.0, 100.0, tiers) == 0.25
    assert reward(110.0, 100.0, tiers) == 0.1
    assert reward(130.0, 100.0, tiers) == 0.0
    assert reward(-100.0, 100.0, tiers) == 0.0              # a sign error
    assert reward(None, 100.0, tiers) == 0.0                # unparseable
    assert reward("yes", "yes", tiers) == 1.0 and reward("no", "yes", tiers) == 0.0
    assert reward(1.0, "yes", tiers) == 0.0
    assert reward(0.0, 0.0, tiers) == 1.0 and reward(1e-12, 0.0, tiers) == 1.0
    assert reward(103.0, 100.0, []) == 0.0


def test_pipeline_commands_are_atomic_and_resumable(shared_fixtures, tmp_path, capsys):
    from app.tasks.ranking.pipeline import run_step

    src = shared_fixtures / "finqa" / "train_sample.json"
    prep, cands, rew = tmp_path / "prep.jsonl", tmp_path / "cand.jsonl", tmp_path / "rew.jsonl"
    assert run_step("prepare", src, prep, "configs/ranking.py") == 0
    out = capsys.readouterr().out
    assert "gold programs: 20/20 execute to exe_ans" in out
    stats = json.loads((tmp_path / "prep.stats.json").read_text())
    assert stats["gold_executed"] == 20 and stats["gold_programs"] == 20
    before = prep.stat().st_mtime_ns
    assert run_step("prepare", src, prep, "configs/ranking.py") == 0
    assert "up to date" in capsys.readouterr().out and prep.stat().st_mtime_ns == before
    assert run_step("candidates", prep, cands, "configs/ranking.py") == 0
    assert run_step("rewards", cands, rew, "configs/ranking.py") == 0
    rows = [json.loads(x) for x in rew.read_text().splitlines()]
    assert len(rows) == 20 and all(len(r["rewards"]) == 8 and max(r["rewards"]) == 1.0 for r in rows)
    assert all(0.0 <= x <= 1.0 for r in rows for x in r["rewards"])
    # other settings recompute; a file with a torn stats file recomputes too
    assert run_step("candidates", prep, cands, "configs/ranking.py", ["--seed=5"]) == 0
    assert "up to date" not in capsys.readouterr().out
    (tmp_path / "cand.stats.json").write_text("{")
    assert run_step("candidates", prep, cands, "configs/ranking.py", ["--seed=5"]) == 0
    assert not list(tmp_path.glob(".*.tmp"))


def _finqa(tmp_path, mutate) -> Path:
    records = json.loads((ROOT.parent / "shared/fixtures/finqa/train_sample.json").read_text())[:3]
    mutate(records)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[1].pop("qa"), "record 1 (" ),
    (lambda r: r[2]["qa"].update(program="divide(1, 2"), "does not parse"),
    (lambda r: r[0]["table"].append(["only one cell"]), "cells, the header has"),
    (lambda r: r[0]["qa"].pop("exe_ans"), "missing 'qa.exe_ans'"),
])
def test_bad_finqa_records_are_one_line_errors_or_skipped(shared_fixtures, tmp_path, capsys, mutate, message):
    from app.tasks.ranking.pipeline import run_step

    path = _finqa(tmp_path, mutate)
    with pytest.raises(UserError, match="bad.json: record") as err:
        run_step("prepare", path, tmp_path / "out.jsonl", "configs/ranking.py")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.jsonl").exists()
    assert run_step("prepare", path, tmp_path / "out.jsonl", "configs/ranking.py", ["--rank_bad_records='skip'"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad records" in out and "gold programs: 2/2" in out


# --- the flattened FinQA export -------------------------------------------------------------------------------------
FLAT_TABLE = [["", "2019", "2018"], ["net sales", "$ 1,200", "$ 800"], ["bonds", "114400", "329500"]]


def flattened_records() -> list[dict]:
    """Records as the flattened export writes them: the answer as text ("50%", "34.7%"), a number or yes/no."""
    base = {"pre_text": ["Sales grew.", "Bonds were issued."], "post_text": ["All figures in $."], "table": FLAT_TABLE}
    return [
        {"id": "A/page_1.pdf-1", "question": "what was the growth in net sales?", **base, "answer": "50%",
         "program": "subtract(1200, 800), divide(#0, 800)", "gold_inds": {"table_1": "net sales : $ 1,200 ; $ 800"}},
        {"id": "A/page_1.pdf-2", "question": "what portion of the bonds matures in 2019?", **base, "answer": "34.7%",
         "program": "divide(114400, 329500)"},
        {"id": "A/page_1.pdf-3", "question": "what is the total of 400 and 7?", **base, "answer": 407,
         "program": "add(400, 7)"},
        {"id": "A/page_1.pdf-4", "question": "did net sales grow?", **base, "answer": "yes",
         "program": "greater(1200, 800)"},
        {"id": "A/page_1.pdf-5", "question": "what is one percent as a fraction?", **base, "answer": "0.1",
         "program": "divide(1, 100)"},
    ]


def as_original_schema(record: dict, exe_ans) -> dict:
    rest = {k: v for k, v in record.items() if k not in ("question", "program", "answer", "gold_inds")}
    qa = {"question": record["question"], "program": record["program"], "exe_ans": exe_ans}
    if "gold_inds" in record:
        qa["gold_inds"] = record["gold_inds"]
    return {**rest, "qa": qa}


def prepare(path: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from app.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["ranking", "prepare", str(path), str(out), *extra])
    return code, stdout.getvalue(), stderr.getvalue()


def test_flattened_finqa_prepares_as_the_original_schema_does(tmp_path):
    records = flattened_records()
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, _ = prepare(tmp_path / "flat.jsonl", tmp_path / "flat.prepared.jsonl")
    assert code == 0 and "gold programs: 4/5 execute to exe_ans" in out
    rows = [json.loads(x) for x in (tmp_path / "flat.prepared.jsonl").read_text().splitlines()]
    assert [r["gold_answer"] for r in rows] == [0.5, 0.34719, 407.0, "yes", 0.1]  # "34.7%": the program's 0.34719
    first = rows[0]
    assert first == {"id": "A/page_1.pdf-1", "question": "what was the growth in net sales?",
                     "context": "Sales grew. Bonds were issued.\n : 2019 ; 2018\nnet sales : $ 1,200 ; $ 800\n"
                                "bonds : 114400 ; 329500\nAll figures in $.",
                     "gold_program": "subtract(1200, 800), divide(#0, 800)", "gold_answer": 0.5, "table": FLAT_TABLE,
                     "record": 0}
    stats = json.loads((tmp_path / "flat.prepared.stats.json").read_text())
    assert stats["gold_executed"] == 4 and stats["problems"] == [
        "record 4 (A/page_1.pdf-5): program gives 0.01, exe_ans is 0.1"]
    # the same records in the original schema, exe_ans as FinQA holds it, prepare to the same rows
    original = [as_original_schema(r, a) for r, a in zip(records, [0.5, 0.34719, 407.0, "yes", 0.1])]
    (tmp_path / "original.json").write_text(json.dumps(original))
    assert prepare(tmp_path / "original.json", tmp_path / "original.prepared.jsonl")[0] == 0
    assert [json.loads(x) for x in (tmp_path / "original.prepared.jsonl").read_text().splitlines()] == rows
    code, _, _ = prepare(tmp_path / "flat.jsonl", tmp_path / "gold.jsonl", "--rank_context='gold'")
    gold = [json.loads(x)["context"] for x in (tmp_path / "gold.jsonl").read_text().splitlines()]
    assert code == 0 and gold == ["net sales : $ 1,200 ; $ 800", "", "", "", ""]


@pytest.mark.parametrize("change, message", [
    ({"question": None, "program": None, "answer": None}, "missing 'qa' (or, flattened, 'question', 'program' and "
                                                          "'answer')"),
    ({"answer": None}, "missing 'answer' (a record without 'qa' needs question, program and answer)"),
    ({"program": None, "answer": None}, "missing 'program', 'answer' (a record without 'qa' needs question, program "
                                        "and answer)"),
    ({"answer": "about half"}, "'answer' 'about half' is not a number or yes/no"),
    ({"answer": True}, "'answer' True is not a number or yes/no"),
    ({"program": ["divide", 1, 2]}, "'program' must be a string"),
    ({"program": "divide(1, 2"}, "program 'divide(1, 2' does not parse"),
    ({"question": "  "}, "'question' must be a non-empty string"),
    ({"table": [["", "2019"], ["net sales"]]}, "table row 1 has 1 cells, the header has 2"),
])
def test_bad_flattened_record_is_one_line_exit_2_and_nothing_written(tmp_path, change, message):
    records = flattened_records()[:3]
    records[1] = {k: v for k, v in {**records[1], **change}.items() if v is not None}
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(records))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = prepare(path, tmp_path / "out.jsonl")
    assert code == 2 and out == "" and err == f"error: {path}: record 1 (A/page_1.pdf-2): {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_input_exits_2_with_one_line(tmp_path, shared_fixtures):
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"question": "q", "context": "c", "candidates": [{"text": "a"}], "rewards": [2]}) + "\n")
    r = run_app("ranking", "rank", str(bad), "--checkpoint", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "checkpoint not found" in r.stderr
    r = run_app("ranking", "candidates", str(shared_fixtures / "finqa" / "train_sample.json"), str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing" in r.stderr, r.stderr
    r = run_app("ranking", "prepare", str(tmp_path / "missing.json"), str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "file not found" in r.stderr
    r = run_app("train", "configs/ranking_tiny.py", f"--train_file={bad}", f"--out_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stderr.strip().endswith("reward 0 must be a number in [0, 1], found 2"), r.stderr
    assert r.stderr.strip().count("\n") == 0 and not (tmp_path / "run").exists()


# --- the model ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return model, tok


def sample_features(tok, cfg, n=4, offset=0) -> list[Feature]:
    rows = [json.loads(x) for x in (SAMPLE / "dev.jsonl").read_text().splitlines()[offset : offset + n]]
    for k, r in enumerate(rows):  # different prefix lengths and candidate counts within one batch
        r["context"] = r["context"] + " Anna is reading." * k
        r["candidates"], r["rewards"] = r["candidates"][: 8 - k], r["rewards"][: 8 - k]
        if max(r["rewards"]) == 0:
            r["rewards"][0] = 1.0
    return [feature_of(r, tok, cfg) for r in rows]


def scores_and_grads(objective, batch, shared, side="right", loss="ce"):
    objective.zero_grad()
    objective.padding_side = side
    s = objective.candidate_scores(batch["prefix_ids"], batch["prefix_mask"], batch["cand_ids"], batch["cand_mask"],
                                   batch["cand_valid"], shared=shared)
    listwise_loss(s, batch["rewards"], batch["cand_valid"], loss, 0.1).backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return s.detach(), grads


@pytest.mark.parametrize("loss", ["ce", "multi_positive", "listnet"])
def test_shared_prefix_equals_flattened_and_padding_side_does_not_matter(tiny, tmp_path, loss):
    model, tok = tiny
    cfg = rk_config(None, tmp_path)
    batch = collate_ranking(sample_features(tok, cfg), tok.pad_token_id)
    torch.manual_seed(1)
    objective = RankingObjective(model, ScoreHead(96, 32, 0.0), loss=loss, pad_id=tok.pad_token_id).eval()
    shared, g_shared = scores_and_grads(objective, batch, True, loss=loss)
    right, g_right = scores_and_grads(objective, batch, False, "right", loss=loss)
    left, g_left = scores_and_grads(objective, batch, False, "left", loss=loss)
    objective.chunk = 5
    chunked, g_chunked = scores_and_grads(objective, batch, True, loss=loss)
    valid = batch["cand_valid"]
    assert torch.isinf(shared[~valid]).all() and valid.sum() == 8 + 7 + 6 + 5
    for other in (right, left, chunked):
        assert torch.allclose(shared[valid], other[valid], atol=1e-5, rtol=0)
    assert set(g_shared) == set(g_right) == set(g_left) and len(g_shared) > 10  # backbone and head
    for grads in (g_right, g_left, g_chunked):
        for name, g in g_shared.items():
            assert torch.allclose(g, grads[name], atol=1e-5, rtol=1e-4), name


def test_shared_prefix_equals_flattened_with_eager_attention(tiny, tmp_path):
    model, tok = tiny
    batch = collate_ranking(sample_features(tok, rk_config(None, tmp_path)), tok.pad_token_id)
    objective = RankingObjective(model, ScoreHead(96, 32, 0.0), pad_id=tok.pad_token_id).eval()
    model.config._attn_implementation = "eager"
    try:
        shared, g_shared = scores_and_grads(objective, batch, True)
        left, g_left = scores_and_grads(objective, batch, False, "left")
    finally:
        model.config._attn_implementation = "sdpa"
    valid = batch["cand_valid"]
    assert torch.allclose(shared[valid], left[valid], atol=1e-5, rtol=0)
    for name, g in g_shared.items():
        assert torch.allclose(g, g_left[name], atol=1e-5, rtol=1e-4), name


def test_activation_checkpointing_falls_back_to_the_flattened_forward(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.lm.modeling import enable_activation_checkpointing

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    batch = collate_ranking(sample_features(tok, rk_config(None, tmp_path)), tok.pad_token_id)
    objective = RankingObjective(model, ScoreHead(96, 32, 0.0), pad_id=tok.pad_token_id)
    objective.eval()
    reference, g_reference = scores_and_grads(objective, batch, True)
    enable_activation_checkpointing(model)
    objective.train()
    model.train()
    assert objective._pooled_shared(batch["prefix_ids"], batch["prefix_mask"], batch["cand_ids"], batch["cand_mask"],
                                    *batch["cand_valid"].nonzero(as_tuple=True)) is None
    checkpointed, g_checkpointed = scores_and_grads(objective, batch, True)
    valid = batch["cand_valid"]
    assert torch.allclose(reference[valid], checkpointed[valid], atol=1e-5)
    for name, g in g_reference.items():
        assert torch.allclose(g, g_checkpointed[name], atol=1e-5, rtol=1e-4), name


def test_scores_do_not_depend_on_the_batch(tiny, tmp_path):
    model, tok = tiny
    cfg = rk_config(None, tmp_path)
    feats = sample_features(tok, cfg, n=4)
    objective = RankingObjective(model, ScoreHead(96, 32, 0.0), pad_id=tok.pad_token_id).eval()
    together = objective.scores(**collate_ranking(feats, tok.pad_token_id))
    reordered = objective.scores(**collate_ranking(feats[::-1], tok.pad_token_id)).flip(0)
    for i, f in enumerate(feats):
        alone = objective.scores(**collate_ranking([f], tok.pad_token_id))[0]
        k = len(f.extra["candidates"])
        assert torch.allclose(alone[:k], together[i, :k], atol=1e-5)
        assert torch.allclose(reordered[i, :k], together[i, :k], atol=1e-5)
        # where a candidate sits among its question's candidates does not matter either
        perm = list(range(k))[::-1]
        moved = Feature(f.input_ids, f.labels, 0, {**f.extra, "candidates": [f.extra["candidates"][p] for p in perm]})
        flipped = objective.scores(**collate_ranking([moved], tok.pad_token_id))[0, :k]
        assert torch.allclose(flipped, alone[:k].flip(0), atol=1e-5)


def test_overlength_truncates_the_context_and_keeps_candidates(tiny, tmp_path):
    _, tok = tiny
    row = json.loads((SAMPLE / "dev.jsonl").read_text().splitlines()[0])
    row["context"] = row["context"] * 30
    cfg = rk_config(None, tmp_path, max_seq_length=64)
    f = feature_of(row, tok, cfg)
    assert f.extra["cut"] and len(f.input_ids) + max(map(len, f.extra["candidates"])) <= 64
    assert tok.decode(f.input_ids).rstrip().endswith("Candidate:")
    full = feature_of({**row, "context": row["context"][:50]}, tok, cfg)
    assert f.extra["candidates"] == full.extra["candidates"]
    with pytest.raises(UserError, match="max_seq_length=64"):
        feature_of(row, tok, rk_config(None, tmp_path, max_seq_length=64, overlength="error"), where="x.jsonl:1")
    assert Ranking().loss_items(feature_of(row, tok, rk_config(None, tmp_path, max_seq_length=64,
                                                                overlength="drop"))) == 0


# --- training -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranking") / "run"
    cfg = rk_config(tiny_model_dir, out, eval_every=60)
    assert train(cfg) == 0
    return cfg, out


@pytest.mark.slow
def test_tiny_config_learns_the_synthetic_set(full_run):
    cfg, out = full_run
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval/accuracy"' in x]
    final = evals[-1]
    assert final["eval/accuracy"] >= 0.8, final  # random pick: 0.125
    assert final["eval/random_accuracy"] == pytest.approx(0.125)
    assert final["eval/oracle_accuracy"] == 1.0
    assert (out / "checkpoints/best" / HEAD_FILE).is_file()
    assert (out / "checkpoints/best_reward_ratio" / HEAD_FILE).is_file()
    saved = json.loads(next((out / "eval").glob("step_*_ranking.json")).read_text())
    assert {"accuracy", "reward_ratio", "avg_reward", "mrr", "ndcg", "exec_accuracy"} <= set(saved)


@pytest.mark.slow
def test_head_loads_with_strict_key_check(full_run, tmp_path):
    _, out = full_run
    state = load_file(str(out / "checkpoints/final" / HEAD_FILE))
    head = ScoreHead(96, 64, 0.0)
    load_head(head, out / "checkpoints/final")
    save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / HEAD_FILE))
    with pytest.raises(UserError, match="unexpected: \\['extra.weight'\\]"):
        load_head(head, tmp_path)
    with pytest.raises(UserError, match="has shape"):
        load_head(ScoreHead(96, 32, 0.0), out / "checkpoints/final")
    with pytest.raises(UserError, match="missing"):
        load_head(head, tmp_path / "nowhere")


@pytest.mark.slow
def test_rank_command_and_infer_resume(full_run, tmp_path, capsys):
    from app.runs import run_predictor

    _, out = full_run
    output = tmp_path / "rankings.jsonl"
    summary = run_predictor(SAMPLE / "dev.jsonl", str(out), output, progress=False, task_name="ranking")
    rows = [json.loads(x) for x in output.read_text().splitlines()]
    assert len(rows) == 64 and [r["index"] for r in rows] == list(range(64))
    assert all(len(r["scores"]) == 8 and r["pick"] == max(range(8), key=lambda k: r["scores"][k]) for r in rows)
    assert summary["metrics"]["accuracy"] >= 0.8
    metrics = json.loads((tmp_path / "rankings.metrics.json").read_text())["metrics"]
    # a kill after some batches: the partial file is continued, the rows done are not predicted again
    partial = tmp_path / "again.jsonl.partial.jsonl"
    from app.runs import PartialFile, checkpoint_config, fingerprint, resolve_checkpoint

    ckpt, _ = resolve_checkpoint(str(out))
    cfg = checkpoint_config(ckpt)
    pf = PartialFile(partial, fingerprint(SAMPLE / "dev.jsonl", ckpt, cfg, {}), 64)
    pf.add([{"i": i, "scores": rows[i]["scores"]} for i in range(10)])
    pf.close()
    again = run_predictor(SAMPLE / "dev.jsonl", str(out), tmp_path / "again.jsonl", progress=False)
    assert again["rows_predicted_now"] == 54 and not partial.exists()
    got = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [r["pick"] for r in got] == [r["pick"] for r in rows]
    assert json.loads((tmp_path / "again.metrics.json").read_text())["metrics"] == pytest.approx(metrics)


def test_interrupted_run_resumes_exactly(tiny_model_dir, tmp_path):
    common = dict(max_steps=12, eval_every=1000, dev_file=None, save_every=4, finetuning="lora", lora_r=4,
                  lora_alpha=8, lora_dropout=0.2, rank_head_dropout=0.2)
    ref = rk_config(tiny_model_dir, tmp_path / "ref", **common)
    assert train(ref) == 0
    part = rk_config(tiny_model_dir, tmp_path / "part", stop_after_steps=5, **common)
    assert train(part) == 0
    assert not (tmp_path / "part/checkpoints/final").exists()
    assert train(rk_config(tiny_model_dir, tmp_path / "part", **common)) == 0
    for name in ("adapter_model.safetensors", HEAD_FILE):
        a = load_file(str(tmp_path / "ref/checkpoints/final" / name))
        b = load_file(str(tmp_path / "part/checkpoints/final" / name))
        assert set(a) == set(b) and a
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_lora_adapter_and_head_load_back_without_retraining(tiny_model_dir, tmp_path):
    from app.tasks.ranking.predict import load_ranker

    cfg = rk_config(tiny_model_dir, tmp_path / "lora", max_steps=6, eval_every=1000, dev_file=None,
                    finetuning="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    captured = {}
    original = Ranking.objective

    def spy(self, model, tokenizer, cfg_):
        captured["objective"] = original(self, model, tokenizer, cfg_)
        return captured["objective"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Ranking, "objective", spy)
        assert train(cfg) == 0
    final = tmp_path / "lora/checkpoints/final"
    assert (final / "adapter_model.safetensors").is_file() and (final / HEAD_FILE).is_file()
    objective, tok = load_ranker(final, cfg, torch.device("cpu"))
    feats = sample_features(tok, cfg)
    batch = collate_ranking(feats, tok.pad_token_id)
    trained = captured["objective"].eval()
    assert torch.allclose(objective.scores(**batch), trained.scores(**batch), atol=1e-5)


def test_listwise_losses():
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]])
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    log_p = torch.log_softmax(scores[:, :3], 1)[0]
    assert listwise_loss(scores, rewards, valid, "ce").item() == pytest.approx(-log_p[1].item())  # first best
    assert listwise_loss(scores, rewards, valid, "multi_positive").item() == pytest.approx(
        -torch.logsumexp(log_p[1:], 0).item())
    target = torch.softmax(rewards[0, :3] / 0.5, 0)
    assert listwise_loss(scores, rewards, valid, "listnet", 0.5).item() == pytest.approx(-(target * log_p).sum().item())
    two = listwise_loss(scores.repeat(2, 1), rewards.repeat(2, 1), valid.repeat(2, 1), "listnet", 0.5)
    assert two.item() == pytest.approx(2 * listwise_loss(scores, rewards, valid, "listnet", 0.5).item())  # summed


@pytest.mark.parametrize("loss", ["multi_positive", "listnet"])
def test_other_losses_train(tiny_model_dir, tmp_path, loss):
    cfg = rk_config(tiny_model_dir, tmp_path / loss, rank_loss=loss, max_steps=8, eval_every=1000, dev_file=None)
    assert train(cfg) == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert len(losses) == 8 and all(x == x and x >= 0 for x in losses)


def test_gold_context_is_the_annotated_facts(shared_fixtures):
    rows, _ = prepare_records(shared_fixtures / "finqa" / "train_sample.json", context="gold")
    record = json.loads((shared_fixtures / "finqa" / "train_sample.json").read_text())[0]
    assert rows[0]["context"] == "\n".join(record["qa"]["gold_inds"].values())
    full, _ = prepare_records(shared_fixtures / "finqa" / "train_sample.json")
    assert record["table"][2][0] in full[0]["context"] and record["pre_text"][0].strip() in full[0]["context"]


def test_bundled_sample_is_what_the_writer_writes(tmp_path):
    from app.tasks import write_sample

    written = write_sample("ranking", tmp_path)
    assert sorted(p.name for p in written) == ["dev.jsonl", "train.jsonl"]
    for p in written:
        assert p.read_bytes() == (SAMPLE / p.name).read_bytes()
    rows = [json.loads(x) for x in (SAMPLE / "train.jsonl").read_text().splitlines()]
    assert all(len(r["candidates"]) == 8 and sorted(r["rewards"]) == [0.0] * 7 + [1.0] for r in rows)
    assert len({r["rewards"].index(1.0) for r in rows}) == 8  # the right one is anywhere


@pytest.mark.slow
def test_rank_command_line(full_run, tmp_path):
    _, out = full_run
    rows = [json.loads(x) for x in (SAMPLE / "dev.jsonl").read_text().splitlines()[:6]]
    for r in rows:  # as `ranking candidates` writes them: no rewards yet, a gold answer
        del r["rewards"], r["exact"]
    src = tmp_path / "cands.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_app("ranking", "rank", str(src), "--checkpoint", str(out), "--output", str(tmp_path / "r.jsonl"),
                   "--infer_batch_size=4")
    assert done.returncode == 0, done.stderr
    assert "6 questions ranked (48 candidates)" in done.stdout and "accuracy" in done.stdout
    got = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert all(g["pick_text"] == rows[i]["candidates"][g["pick"]]["text"] and "reward" in g for i, g in enumerate(got))
    assert not (tmp_path / "r.jsonl.partial.jsonl").exists()
