"""`python -m app infer`: order and row count end to end, resume after a kill, bad input and settings, real rows.

One tiny checkpoint, trained for two steps at a tiny learning rate, serves the whole module: its weights are still
nearly random, so generations differ from row to row (which makes order checks meaningful) and never parse within the
small max_new_tokens used here, so the forced-prefix fallback labels the rows.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

from app.__main__ import main
from app.runs import PartialFile, find_checkpoint, resolve_checkpoint
from app.tasks.nli_cot.predict import OutputPaths

NEW_TOKENS = "--max_new_tokens=6"
BATCH = "--infer_batch_size=4"



@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir) -> Path:
    """A directory holding checkpoints/tinyrun/checkpoints/final, trained for a few steps."""
    from app.config import load_config
    from app.train import train

    root = tmp_path_factory.mktemp("infer")
    cfg = load_config(ROOT / "configs" / "tiny.py", [
        f"--model_name={tiny_model_dir}", f"--train_file={ROOT / 'data' / 'sample' / 'train.csv'}", "--dev_file=None",
        f"--out_dir={root / 'checkpoints' / 'tinyrun'}", "--create_tiny_model=False", "--max_steps=2", "--learning_rate=1e-5",
        "--batch_size=4", "--micro_batch_size=4", "--warmup_steps=0", "--save_every=1000", "--log_every=1",
        "--tensorboard=False",
    ])
    assert train(cfg) == 0
    assert (root / "checkpoints" / "tinyrun" / "checkpoints" / "final" / "trainer_state.json").is_file()
    return root


def ckpt(workdir: Path) -> str:
    return str(workdir / "checkpoints" / "tinyrun" / "checkpoints" / "final")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def mirrored_input(workdir) -> Path:
    """12 sample rows (made to differ in prompt length), then the same rows reversed, with ids and labels.

    The two copies of a row have the same prompt length, so the length sort puts them side by side in one batch (the
    batch size is even): identical computations, so their predictions must match if rows go back to their places.
    """
    from transformers import AutoTokenizer

    from app.tasks.nli_cot.prompts import build_prompt
    from app.config import make_config

    tok = AutoTokenizer.from_pretrained(ckpt(workdir))
    cfg = make_config()
    picked, seen = [], set()
    for row in read_csv(ROOT / "data" / "sample" / "test.csv")[:12]:
        row = dict(row)
        while (n := len(tok(build_prompt(row, cfg)).input_ids)) in seen:
            row["premise"] += " Really."
        seen.add(n)
        picked.append(row)
    rows = picked + picked[::-1]
    return write_csv(workdir / "mirrored.csv", ["id", "premise", "hypothesis", "label", "extra"],
                     [[f"r{i}", r["premise"], r["hypothesis"], r["label"], "x"] for i, r in enumerate(rows)])


@pytest.fixture(scope="module")
def reference(workdir, mirrored_input) -> dict:
    """An uninterrupted run, started from the work directory without --checkpoint (the checkpoint is picked)."""
    out = workdir / "ref" / "predictions.csv"
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        stdout, stderr = io.StringIO(), io.StringIO()
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = main(["infer", str(mirrored_input), "--output", str(out), NEW_TOKENS, BATCH])
    finally:
        os.chdir(cwd)
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_order_count_and_fallback_rows(reference, mirrored_input):
    assert reference["code"] == 0, reference["stderr"]
    assert "checkpoint: checkpoints/tinyrun/checkpoints/final" in reference["stderr"]
    rows = read_csv(reference["out"])
    assert len(rows) == 24
    assert list(rows[0]) == ["index", "id", "predicted_label", "thought_process", "parse_ok"]
    assert [r["index"] for r in rows] == [str(i) for i in range(24)]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(24)]
    assert all(r["predicted_label"] in ("0", "1") for r in rows)
    assert all(r["parse_ok"] in ("true", "false") for r in rows)
    assert any(r["parse_ok"] == "false" for r in rows), "expected unparsed generations from a barely trained model"
    assert len({(r["predicted_label"], r["thought_process"]) for r in rows[:12]}) >= 6  # rows do differ
    for i in range(12):  # a row and its mirrored copy: same prediction
        a, b = rows[i], rows[23 - i]
        assert (a["predicted_label"], a["thought_process"], a["parse_ok"]) == (
            b["predicted_label"], b["thought_process"], b["parse_ok"]), i

    paths = OutputPaths.for_output(reference["out"])
    labels = paths.solution.read_text().splitlines()
    assert labels == [r["predicted_label"] for r in rows]
    assert not paths.partial.exists()
    summary = json.loads(paths.metrics.read_text())
    assert summary["rows"] == 24
    assert summary["parse_failures"] == sum(r["parse_ok"] == "false" for r in rows)
    assert summary["metrics"]["n"] == 24
    assert "accuracy" in reference["stdout"] and "parse fallbacks:" in reference["stdout"]
    assert "premise" in reference["stdout"] and "hypothesis" in reference["stdout"]  # the examples table


SLOW_BATCHES = """
import sys, time
import app.runs as runs
add = runs.PartialFile.add
def slow_add(self, records):
    out = add(self, records)
    time.sleep(0.4)
    return out
runs.PartialFile.add = slow_add
from app.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(workdir, mirrored_input, reference, capsys):
    out = workdir / "killed" / "predictions.csv"
    paths = OutputPaths.for_output(out)
    args = ["infer", str(mirrored_input), "--checkpoint", ckpt(workdir), "--output", str(out), NEW_TOKENS, BATCH]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(workdir / "killed.log", "w+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BATCHES, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if paths.partial.exists() and paths.partial.read_text().count("\n") >= 3:  # header + 2 batches
                break
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed:\n{log.read()}")
            time.sleep(0.05)
        else:
            pytest.fail("no batch was written in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not out.exists()
    done = set()
    for line in paths.partial.read_text().split("\n")[1:-1]:  # complete lines after the header
        done |= {rec["i"] for rec in json.loads(line)["records"]}
    assert 8 <= len(done) < 24, sorted(done)
    with open(paths.partial, "a", encoding="utf-8") as f:
        f.write('{"records": [{"i": 0, "label"')  # as if killed in the middle of a write

    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"resuming: {len(done)} of 24 rows" in err
    assert out.read_text() == reference["out"].read_text()
    assert paths.solution.read_bytes() == OutputPaths.for_output(reference["out"]).solution.read_bytes()
    assert not paths.partial.exists()


def test_partial_file_of_another_run_is_discarded(tmp_path, capsys):
    path = tmp_path / "p.csv.partial.jsonl"
    part = PartialFile(path, "aaa", 3)
    part.add([{"i": 0, "label": 1}, {"i": 1, "label": 0}])
    part.add([{"i": 1, "label": 1}])  # already done: not written twice
    part.close()
    assert len(path.read_text().splitlines()) == 2
    again = PartialFile(path, "aaa", 3)
    assert again.done == {0: {"i": 0, "label": 1}, 1: {"i": 1, "label": 0}}
    again.close()
    other = PartialFile(path, "bbb", 3)
    assert other.done == {}
    other.add([{"i": 2, "label": 0}])  # the first finished batch replaces the other run's file
    other.close()
    assert "another input, checkpoint or config" in capsys.readouterr().err
    assert json.loads(path.read_text().splitlines()[0])["fingerprint"] == "bbb"
    assert len(path.read_text().splitlines()) == 2
    unused = PartialFile(tmp_path / "never.partial.jsonl", "ccc", 3)  # nothing finished: nothing written
    unused.close()
    assert not (tmp_path / "never.partial.jsonl").exists()


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "empty.csv").write_text("")
    (tmp / "header_only.csv").write_text("premise,hypothesis\n")
    (tmp / "bytes.csv").write_bytes(b"premise,hypothesis\nok,fine\n\xff\xfe bad,x\n")
    write_csv(tmp / "nohyp.csv", ["premise", "label"], [["a", "1"]])
    write_csv(tmp / "badlabel.csv", ["premise", "hypothesis", "label"], [["a", "b", "1"], ["a", "b", "maybe"]])
    return {
        "empty": (tmp / "empty.csv", "empty.csv: file is empty"),
        "header_only": (tmp / "header_only.csv", "header_only.csv: no data rows"),
        "undecodable": (tmp / "bytes.csv", "bytes.csv:3: not valid UTF-8"),
        "missing_column": (tmp / "nohyp.csv", "nohyp.csv:1: missing column(s) hypothesis"),
        "bad_label": (tmp / "badlabel.csv", "badlabel.csv:3: label must be 0 or 1"),
        "not_found": (tmp / "nope.csv", "nope.csv: file not found"),
    }


@pytest.mark.parametrize("case", ["empty", "header_only", "undecodable", "missing_column", "bad_label", "not_found"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, workdir, capsys):
    path, message = _bad_inputs(tmp_path)[case]
    code = main(["infer", str(path), "--checkpoint", ckpt(workdir), "--output", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--infer_batch_sise=8"], "did you mean 'infer_batch_size'"),
    (["--infer_batch_size=0"], "infer_batch_size=0"),
    (["--backend=vllm"], "pip install 'finetune-runner[vllm]'"),
])
def test_bad_settings_exit_2(args, message, tmp_path, workdir, mirrored_input, capsys):
    if "vllm" in message:
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            pytest.skip("vllm is installed here")
    code = main(["infer", str(mirrored_input), "--checkpoint", ckpt(workdir), "--output", str(tmp_path / "o.csv"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")  # checked before anything runs
    assert not list(tmp_path.iterdir())  # no output, no partial file


def test_no_checkpoint_anywhere(tmp_path, monkeypatch, mirrored_input, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["infer", str(mirrored_input)]) == 2
    assert "no complete checkpoint under checkpoints/*/checkpoints/" in capsys.readouterr().err


def _fake_checkpoint(path: Path, mtime: float) -> None:
    path.mkdir(parents=True)
    (path / "run_config.json").write_text("{}")
    (path / "config.json").write_text("{}")
    (path / "trainer_state.json").write_text("{}")
    os.utime(path / "trainer_state.json", (mtime, mtime))


def test_checkpoint_choice(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root / "old" / "checkpoints" / "final", 1000)
    _fake_checkpoint(root / "new" / "checkpoints" / "step_0000100", 2000)
    _fake_checkpoint(root / "new" / "checkpoints" / "step_0000020", 2100)
    _fake_checkpoint(root / "new" / "checkpoints" / "best", 1900)
    (root / "new" / "checkpoints" / ".tmp-final").mkdir()  # a half-written one never counts
    (root / "broken" / "checkpoints" / "final").mkdir(parents=True)  # no trainer_state.json: incomplete
    assert find_checkpoint(root) == root / "new" / "checkpoints" / "best"
    _fake_checkpoint(root / "new" / "checkpoints" / "final", 2200)
    assert find_checkpoint(root) == root / "new" / "checkpoints" / "final"
    _fake_checkpoint(root / "newer" / "checkpoints" / "step_0000003", 3000)
    _fake_checkpoint(root / "newer" / "checkpoints" / "step_0000012", 2500)
    assert find_checkpoint(root) == root / "newer" / "checkpoints" / "step_0000012"
    # a run directory given as --checkpoint: its preferred checkpoint
    assert resolve_checkpoint(str(root / "new"), root)[0] == root / "new" / "checkpoints" / "final"
    assert resolve_checkpoint(str(root / "old" / "checkpoints" / "final"), root)[0] == root / "old" / "checkpoints" / "final"


def test_shared_trial_and_dev_rows_infer_and_score(shared_fixtures, workdir, tmp_path, capsys):
    from app.score import score_files

    for name, n in (("NLI_trial.csv", 50), ("dev_sample.csv", 200)):
        gold = shared_fixtures / "nli" / name
        out = tmp_path / f"{gold.stem}.csv"
        code = main(["infer", str(gold), "--checkpoint", ckpt(workdir), "--output", str(out), "--max_new_tokens=3",
                     "--max_seq_length=160", "--infer_batch_size=50", "--examples=3"])
        assert code == 0, capsys.readouterr().err
        assert len(read_csv(out)) == n
        for pred in (out, OutputPaths.for_output(out).solution):
            metrics, _, _ = score_files(pred, gold)
            assert metrics["n"] == n and 0.0 <= metrics["accuracy"] <= 1.0
        assert main(["score", "--pred", str(out), "--gold", str(gold)]) == 0
