"""The shell of checkpoint commands (app/runs.py) and the run directory's guards: a checkpoint never widens trust,
every check comes before any work, `resume=fresh` only moves the run's own checkpoints, predictions read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.__main__ import main
from app.errors import UserError
from conftest import ROOT, tiny_config

MARKER_MODULE = """
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("the checkpoint's own code ran")
from transformers import MistralConfig


class EvilConfig(MistralConfig):
    model_type = "mistral"
"""


@pytest.fixture(scope="module")
def full_checkpoint(tiny_final_checkpoint) -> Path:
    return tiny_final_checkpoint


def _with_remote_code(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (dst / "config.json").write_text(json.dumps(config))
    run_config = json.loads((dst / "run_config.json").read_text())
    run_config["trust_remote_code"] = True  # as if the checkpoint's maker had turned it on
    (dst / "run_config.json").write_text(json.dumps(run_config))
    (dst / "evil.py").write_text(MARKER_MODULE)
    (dst / "manifest.json").unlink(missing_ok=True)  # no manifest: the cheap checks apply, not a checksum failure
    return dst


def test_a_checkpoint_never_runs_its_own_code(full_checkpoint, tmp_path, capsys):
    ckpt = _with_remote_code(full_checkpoint, tmp_path / "evil_ckpt")
    out = tmp_path / "out" / "predictions.csv"
    code = main(["infer", str(ROOT / "data/sample/test.csv"), "--checkpoint", str(ckpt), "--output", str(out),
                 "--max_new_tokens=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "--trust_remote_code=True" in err[0] and "auto_map" in err[0]
    assert not (ckpt / "MARKER").exists()
    assert not (tmp_path / "out").exists()  # nothing written, not even the output folder


def test_trust_from_the_saved_config_is_ignored_without_code(full_checkpoint, tmp_path):
    from app.runs import checkpoint_config

    ckpt = tmp_path / "ckpt"
    shutil.copytree(full_checkpoint, ckpt)
    saved = json.loads((ckpt / "run_config.json").read_text())
    (ckpt / "run_config.json").write_text(json.dumps({**saved, "trust_remote_code": True}))
    assert checkpoint_config(ckpt).trust_remote_code is False
    assert checkpoint_config(ckpt, ["--trust_remote_code=True"]).trust_remote_code is True


def test_output_problems_fail_before_any_row_is_predicted(full_checkpoint, tmp_path, capsys, monkeypatch):
    import app.runs as runs

    def no_work(*args, **kwargs):
        raise AssertionError("predicted although the output cannot be written")

    monkeypatch.setattr(runs, "_predict_missing", no_work)
    (tmp_path / "a_file").write_text("x")
    for output, message in [(tmp_path, "is a directory"), (tmp_path / "a_file" / "p.csv", "is a file")]:
        code = main(["infer", str(ROOT / "data/sample/test.csv"), "--checkpoint", str(full_checkpoint),
                     "--output", str(output)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_failing_checkpoint_load_leaves_no_partial_file(full_checkpoint, tmp_path, capsys, monkeypatch):
    import app.tasks.nli_cot.predict as nli_predict

    def broken(*args, **kwargs):
        raise UserError("model.safetensors: cannot be read")

    monkeypatch.setattr(nli_predict, "load_for_inference", broken)  # the name the NLI predictor loads through
    out = tmp_path / "predictions.csv"
    code = main(["infer", str(ROOT / "data/sample/test.csv"), "--checkpoint", str(full_checkpoint), "--output", str(out)])
    assert code == 2 and "cannot be read" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_predictions_with_any_thought_read_back_through_score_and_infer(tmp_path):
    from app.data import read_rows
    from app.score import score_files
    from app.tasks.nli_cot.predict import predictions_csv

    thoughts = ['plain', 'a "quoted" word, and a comma', "two\nlines", "a bare\rcarriage return", "crlf\r\nend", ""]
    records = [{"label": i % 2, "thought": t, "parse_ok": True} for i, t in enumerate(thoughts)]
    path = tmp_path / "predictions.csv"
    path.write_text(predictions_csv(records, None), encoding="utf-8", newline="")
    rows = read_rows(path, ("predicted_label", "thought_process"))
    assert [r.values["thought_process"] for r in rows] == thoughts
    gold = tmp_path / "gold.solution"
    gold.write_text("".join(f"{i % 2}\n" for i in range(len(thoughts))))
    metrics, _, _ = score_files(path, gold)
    assert metrics["accuracy"] == 1.0 and metrics["n"] == len(thoughts)
    as_input = tmp_path / "input.csv"  # the predictions file as the next run's input (premise/hypothesis columns)
    as_input.write_text(path.read_bytes().decode("utf-8").replace("thought_process", "premise", 1)
                        .replace("parse_ok", "hypothesis", 1), encoding="utf-8", newline="")
    from app.tasks.nli_cot.predict import load_input

    assert [v["premise"] for v in load_input(as_input).values] == thoughts


def test_fresh_only_moves_the_runs_own_checkpoints(tiny_model_dir, tmp_path):
    from app.train import train

    root = tmp_path / "checkpoints"
    other = root / "other_run" / "checkpoints" / "final"
    other.mkdir(parents=True)
    (other / "trainer_state.json").write_text("{}")
    (root / "tiny-model").mkdir()
    for out_dir in (root, root / "other_run" / ".."):  # the parent of runs, however it is spelt
        with pytest.raises(UserError, match="resume='fresh' refused"):
            train(tiny_config(tiny_model_dir, out_dir, resume="fresh", max_steps=1, batch_size=4, micro_batch_size=4))
    assert (other / "trainer_state.json").is_file() and (root / "tiny-model").is_dir()
    own = root / "mine"
    cfg = tiny_config(tiny_model_dir, own, max_steps=1, batch_size=4, micro_batch_size=4)
    assert train(cfg) == 0
    assert train(tiny_config(tiny_model_dir, own, resume="fresh", max_steps=1, batch_size=4, micro_batch_size=4)) == 0
    assert [p.name for p in own.iterdir() if p.name.startswith("checkpoints.old-")]
    assert (other / "trainer_state.json").is_file()


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    from app.atomic import write_atomic

    target = write_atomic(tmp_path / "metrics.json", "old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"metrics\.json: cannot write \(No space left on device\)"):
        write_atomic(target, "new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    from app.runs import PartialFile

    partial = PartialFile(tmp_path / "p.partial.jsonl", "fp", 2)
    with pytest.raises(UserError, match="cannot write"):
        partial.add([{"i": 0}])


def test_infer_on_a_full_disk_exits_2_in_one_line(full_checkpoint, tmp_path, capsys, monkeypatch):
    import errno
    import os

    real = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):  # the final outputs, not the partial file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "predictions.csv"
    code = main(["infer", str(ROOT / "data/sample/test.csv"), "--checkpoint", str(full_checkpoint), "--output", str(out),
                 "--max_new_tokens=2", "--examples=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "No space left on device" in err[-1]
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "predictions.csv.partial.jsonl").is_file()  # every row predicted is kept for the re-run
