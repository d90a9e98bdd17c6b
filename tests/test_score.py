"""The scorer: metrics equal scikit-learn's, and `python -m app score` end to end on both file formats."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

from app.errors import UserError
from app.metrics.classification import METRIC_NAMES, classification_metrics, format_table
from app.__main__ import main as app_main
from app.score import read_labels, score_files, write_json_atomic


def cli(argv):
    return app_main(["score", *argv])

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
NLI = SHARED / "fixtures" / "nli"


def sklearn_metrics(gold, pred) -> dict:
    out = {"n": len(gold), "accuracy": accuracy_score(gold, pred), "mcc": matthews_corrcoef(gold, pred)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, average=average, zero_division=0)
        out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
    return out


def assert_matches_sklearn(gold, pred, got: dict | None = None) -> None:
    got = classification_metrics(gold, pred) if got is None else got
    want = sklearn_metrics(gold, pred)
    assert set(got) >= set(want)
    assert got["n"] == want["n"]
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-12, (key, got[key], want[key], list(gold), list(pred))


# --------------------------------------------------------------------------------------------------------------------
# metrics


def test_random_binary_vectors_match_sklearn():
    rng = np.random.default_rng(2024)
    for _ in range(100):
        n = int(rng.integers(1, 300))
        gold = rng.integers(0, 2, n)
        noise = rng.random()
        pred = np.where(rng.random(n) < noise, 1 - gold, gold)  # from perfect to all wrong
        if rng.random() < 0.2:
            pred = rng.integers(0, 2, n)
        assert_matches_sklearn(gold.tolist(), pred.tolist())


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # scikit-learn's own note
@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ([1], [1]),
        ([0], [1]),
        ([1, 1, 1, 1], [1, 1, 1, 1]),  # one class only, all right
        ([0, 0, 0], [0, 0, 0]),
        ([0, 0, 0], [1, 1, 1]),  # one class only, all wrong
        ([0, 1, 0, 1], [1, 0, 1, 0]),  # both classes, all wrong
        ([1, 1, 1, 0], [1, 1, 1, 1]),  # a constant predictor
        ([0, 0, 1, 1], [0, 0, 0, 0]),
        ([1, 0], [1, 0]),
        ([0, 1, 1, 0, 1], [0, 1, 1, 0, 1]),
    ],
)
def test_degenerate_vectors_match_sklearn(gold, pred):
    assert_matches_sklearn(gold, pred)


def test_multiclass_vectors_match_sklearn():
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(1, 100))
        k = int(rng.integers(2, 5))
        assert_matches_sklearn(rng.integers(0, k, n).tolist(), rng.integers(0, k, n).tolist())


def test_known_values():
    m = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0])
    assert m["n"] == 4 and m["accuracy"] == 0.75
    assert m["precision_macro"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["recall_macro"] == pytest.approx((1 + 0.5) / 2)
    assert m["mcc"] == pytest.approx(1 / 3**0.5)
    assert all(isinstance(v, float) for k, v in m.items() if k != "n") and isinstance(m["n"], int)


def test_metric_errors():
    with pytest.raises(ValueError, match="3 labels but pred has 2"):
        classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no labels"):
        classification_metrics([], [])


def test_format_table():
    table = format_table(classification_metrics([0, 1, 1, 0], [0, 1, 0, 0]))
    lines = table.splitlines()
    assert len(lines) == 2 + 1 + len(METRIC_NAMES)
    assert len({len(line) for line in lines}) == 1  # aligned
    for name in METRIC_NAMES.values():
        assert name in table
    assert "0.7500" in table and "examples (n)" in table


# --------------------------------------------------------------------------------------------------------------------
# reading files (in process)


def write_predictions_csv(path: Path, labels, ids=None, parse_ok=None) -> None:
    """A predictions file as inference writes it, with awkward thoughts (commas, quotes, newlines)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = ["index"] + (["id"] if ids is not None else []) + ["predicted_label", "thought_process", "parse_ok"]
        writer.writerow(header)
        for i, label in enumerate(labels):
            thought = f'Row {i}: the premise says "so", therefore,\nlabel {label}.'
            ok = True if parse_ok is None else parse_ok[i]
            writer.writerow([i] + ([ids[i]] if ids is not None else []) + [label, thought, ok])


def write_lines(path: Path, labels, trailing: str = "\n") -> None:
    path.write_text("\n".join(str(v) for v in labels) + trailing, encoding="utf-8")


def write_gold_csv(path: Path, labels, bom: bool = False) -> None:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["premise", "hypothesis", "label"])
        for i, label in enumerate(labels):
            writer.writerow([f"premise, {i}", f'hypothesis "{i}"', label])


def test_read_labels_formats(tmp_path):
    labels = [0, 1, 1, 0, 1]
    write_lines(tmp_path / "a.solution", labels)
    write_lines(tmp_path / "b.txt", labels, trailing="\r\n\n\n")
    write_gold_csv(tmp_path / "c.csv", labels, bom=True)
    write_predictions_csv(tmp_path / "d.csv", labels, parse_ok=[True, False, True, "False", True])
    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"label": v, "x": "y"}) + "\n" for v in labels))
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"label": bool(v)}) + "\n" for v in labels))
    write_lines(tmp_path / "g.txt", ["1.0" if v else "0.0" for v in labels], trailing="")
    for name, fmt in [("a.solution", "lines"), ("b.txt", "lines"), ("c.csv", "csv"), ("d.csv", "csv"),
                      ("e.jsonl", "jsonl"), ("f.jsonl", "jsonl"), ("g.txt", "lines")]:
        got = read_labels(tmp_path / name, ("predicted_label", "label"), "predictions")
        assert (got.values, got.fmt) == (labels, fmt), name
    assert read_labels(tmp_path / "d.csv", ("predicted_label",), "predictions").parse_failures == 2
    assert read_labels(tmp_path / "c.csv", ("label",), "gold").lines == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("0\n1\n2\n", "bad.txt:3: label must be 0 or 1, found '2'"),
        ("0\n\n1\n", "bad.txt:2: empty line"),
        ("1\nyes\n", "bad.txt:2: label must be 0 or 1"),
        ("premise,hypothesis\na,b\n", "bad.txt:1: gold file needs a label column (columns found: premise, hypothesis)"),
        ("premise,label\na,1\nb,\n", "bad.txt:3: label must be 0 or 1, found ''"),
        ("premise,label\n", "bad.txt: no data rows"),
        ("   \n\n", "bad.txt: file is empty"),
        ('{"label": 1}\n', "bad.txt:1: looks like JSON lines"),
    ],
)
def test_bad_gold_files(tmp_path, content, message):
    (tmp_path / "bad.txt").write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_labels(tmp_path / "bad.txt", ("label",), "gold")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_undecodable_and_missing_files(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"0\n1\n\xff\xfe\n")
    with pytest.raises(UserError, match=r"bin.txt:3: not valid UTF-8"):
        read_labels(tmp_path / "bin.txt", ("label",), "gold")
    with pytest.raises(UserError, match="nope.csv: file not found"):
        read_labels(tmp_path / "nope.csv", ("label",), "gold")


def test_length_mismatch_is_an_error_never_truncation(tmp_path):
    write_lines(tmp_path / "pred.txt", [0, 1, 1])
    write_gold_csv(tmp_path / "gold.csv", [0, 1, 1, 0])
    with pytest.raises(UserError) as err:
        score_files(tmp_path / "pred.txt", tmp_path / "gold.csv")
    assert "3 predictions" in str(err.value) and "4 gold labels" in str(err.value)


def test_ids_must_agree_when_both_files_have_them(tmp_path):
    write_predictions_csv(tmp_path / "pred.csv", [0, 1, 1], ids=["a", "b", "c"])  # two lines a row
    (tmp_path / "gold.csv").write_text("id,label\na,0\nc,1\nb,1\n")
    with pytest.raises(UserError, match=r"pred.csv:4: id 'b' does not match id 'c' at .*gold.csv:3"):
        score_files(tmp_path / "pred.csv", tmp_path / "gold.csv")
    (tmp_path / "gold.csv").write_text("id,label\na,0\nb,1\nc,1\n")
    assert score_files(tmp_path / "pred.csv", tmp_path / "gold.csv")[0]["accuracy"] == 1.0


def test_cli_in_process(tmp_path, capsys):
    write_predictions_csv(tmp_path / "pred.csv", [0, 1, 0, 0], parse_ok=[True, True, False, True])
    write_lines(tmp_path / "gold.solution", [0, 1, 1, 0])
    assert cli(["--pred", str(tmp_path / "pred.csv"), "--gold", str(tmp_path / "gold.solution")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "0.7500" in out and "1 of 4 predictions" in out
    report = json.loads(out[out.index("{") :])
    assert report["parse_failures"] == 1
    assert_matches_sklearn([0, 1, 1, 0], [0, 1, 0, 0], report)


def test_write_json_atomic(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temp files left
    with pytest.raises(UserError, match="cannot write"):
        write_json_atomic(tmp_path / "sub" / "metrics.json" / "x.json", {"a": 3})  # a file as a folder


# --------------------------------------------------------------------------------------------------------------------
# `python -m app score` in a subprocess


def run_score(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "app", "score", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def printed_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def test_cli_csv_predictions_against_label_lines(tmp_path):
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, 120).tolist()
    pred = [g if rng.random() < 0.7 else 1 - g for g in gold]
    write_predictions_csv(tmp_path / "predictions.csv", pred, ids=[f"r{i}" for i in range(120)])
    write_lines(tmp_path / "gold.solution", gold)
    out_json = tmp_path / "out" / "metrics.json"
    proc = run_score("--pred", str(tmp_path / "predictions.csv"), "--gold", str(tmp_path / "gold.solution"),
                     "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr
    assert "F1 (macro)" in proc.stdout and "Matthews" in proc.stdout
    report = printed_json(proc.stdout)
    assert json.loads(out_json.read_text()) == report
    assert_matches_sklearn(gold, pred, report)


def test_cli_label_lines_against_csv_and_jsonl(tmp_path):
    gold = [1, 0, 0, 1, 1, 0, 1]
    pred = [1, 1, 0, 0, 1, 0, 1]
    write_lines(tmp_path / "pred.txt", pred)
    write_gold_csv(tmp_path / "gold.csv", gold, bom=True)
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps({"premise": "p", "label": v}) + "\n" for v in gold))
    for gold_file in ("gold.csv", "gold.jsonl"):
        proc = run_score("--pred", str(tmp_path / "pred.txt"), "--gold", str(tmp_path / gold_file))
        assert proc.returncode == 0, proc.stderr
        assert_matches_sklearn(gold, pred, printed_json(proc.stdout))


def test_cli_mismatched_lengths_exit_2_one_line(tmp_path):
    write_lines(tmp_path / "pred.txt", [0, 1, 1, 0, 1])
    write_gold_csv(tmp_path / "gold.csv", [0, 1, 1, 0])
    proc = run_score("--pred", str(tmp_path / "pred.txt"), "--gold", str(tmp_path / "gold.csv"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "5 predictions" in lines[0] and "4 gold labels" in lines[0] and "pred.txt" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_bad_label_exit_2_names_file_and_line(tmp_path):
    write_lines(tmp_path / "pred.txt", [0, 1, 1])
    (tmp_path / "gold.csv").write_text("premise,hypothesis,label\na,b,1\nc,d,entailment\ne,f,0\n")
    proc = run_score("--pred", str(tmp_path / "pred.txt"), "--gold", str(tmp_path / "gold.csv"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "gold.csv:3: label must be 0 or 1, found 'entailment'" in proc.stderr


def test_score_does_not_import_torch(tmp_path):
    write_lines(tmp_path / "pred.txt", [0, 1])
    write_lines(tmp_path / "gold.txt", [0, 1])
    code = (
        "import sys\nfrom app.__main__ import main\n"
        f"rc = main(['score', '--pred', {str(tmp_path / 'pred.txt')!r}, '--gold', {str(tmp_path / 'gold.txt')!r}])\n"
        "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'score imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------------------------------
# the real course files


def _shared_file(name: str) -> Path:
    path = NLI / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the ../shared fixtures folder is only beside the repository in CI/dev")
    return path


def _gold_labels(path: Path) -> list[int]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return [int(row["label"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize(("name", "rows"), [("NLI_trial.csv", 50), ("dev_sample.csv", 200)])
def test_real_course_files_as_gold(tmp_path, name, rows):
    gold_path = _shared_file(name)
    if name == "NLI_trial.csv":
        assert gold_path.read_bytes().startswith(b"\xef\xbb\xbf")  # the delivered BOM is what we are testing
    gold = _gold_labels(gold_path)
    assert len(gold) == rows
    pred = [1 - g if i % 3 == 0 else g for i, g in enumerate(gold)]  # a third flipped
    write_predictions_csv(tmp_path / "predictions.csv", pred)
    write_lines(tmp_path / "predictions.solution", pred)
    reports = []
    for pred_file in ("predictions.csv", "predictions.solution"):
        proc = run_score("--pred", str(tmp_path / pred_file), "--gold", str(gold_path))
        assert proc.returncode == 0, proc.stderr
        reports.append(printed_json(proc.stdout))
        assert_matches_sklearn(gold, pred, reports[-1])
        assert reports[-1]["n"] == rows
    # the gold file scored against itself (its `label` column read as predictions)
    metrics, _, _ = score_files(gold_path, gold_path)
    assert metrics["accuracy"] == 1.0 and metrics["mcc"] == 1.0
    # one prediction short: an error, not a truncated score
    write_lines(tmp_path / "short.solution", pred[:-1])
    with pytest.raises(UserError, match=f"{rows - 1} predictions .* {rows} gold labels"):
        score_files(tmp_path / "short.solution", gold_path)


# --------------------------------------------------------------------------------------------------------------------
# calibration of a confidence column


def test_confidence_column_adds_calibration(tmp_path, capsys):
    from app.metrics.calibration import calibration_report

    rng = np.random.default_rng(11)
    gold = rng.integers(0, 2, 80).tolist()
    pred = [g if rng.random() < 0.75 else 1 - g for g in gold]
    conf = rng.uniform(0.3, 1.0, 80).round(6).tolist()
    with (tmp_path / "pred.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "predicted_label", "confidence"])
        writer.writerows([i, p, c] for i, (p, c) in enumerate(zip(pred, conf)))
    write_lines(tmp_path / "gold.txt", gold)
    assert cli(["--pred", str(tmp_path / "pred.csv"), "--gold", str(tmp_path / "gold.txt"), "--n_bins", "5",
                "--calib_beta", "20", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "ECE (equal-width, L1)" in out and "Brier score" in out
    report = json.loads((tmp_path / "out.json").read_text())
    want = calibration_report(conf, [int(p == g) for p, g in zip(pred, gold)], n_bins=5, calib_beta=20)
    assert report["calibration"] == json.loads(json.dumps(want))
    assert_matches_sklearn(gold, pred, report)
    # without the column, no calibration section
    write_predictions_csv(tmp_path / "plain.csv", pred)
    assert cli(["--pred", str(tmp_path / "plain.csv"), "--gold", str(tmp_path / "gold.txt")]) == 0
    assert "calibration" not in printed_json(capsys.readouterr().out)


@pytest.mark.parametrize("value", ["1.5", "high", "", "-0.1", "nan"])
def test_bad_confidence_names_file_and_line(tmp_path, value):
    (tmp_path / "pred.csv").write_text(f"predicted_label,confidence\n1,0.5\n0,{value}\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_labels(tmp_path / "pred.csv", ("predicted_label",), "predictions")
    assert "pred.csv:3: confidence must be a probability in [0, 1]" in str(err.value)
