"""`python -m app report`: the page of one run and the comparison of several, from what runs write.

The numbers on the page are checked against metrics.jsonl and the run's own files, the comparison's differing fields
against the two configs, a killed run is reported as such, and the HTML page is opened in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_metrics, run_app, tiny_args, tiny_config

from app.report import collect
from app.report.build import fmt, write_report

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "test-artifacts")


def train_tiny(model_dir: Path, out: Path, **overrides) -> Path:
    from app.train import train

    cfg = tiny_config(model_dir, out, **{"max_steps": 6, "batch_size": 4, "micro_batch_size": 4, "eval_every": 3,
                                         "eval_rows": 8, "eval_batch_size": 8, "max_new_tokens": 8, "save_every": 3,
                                         "dev_file": str(ROOT / "data/sample/dev.csv"), **overrides})
    assert train(cfg) == 0
    return out


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    a = train_tiny(tiny_model_dir, root / "lr_high", learning_rate=2e-3)
    b = train_tiny(tiny_model_dir, root / "lr_low", learning_rate=1e-4, warmup_steps=3)
    return a, b


def table(markdown: str, first_header: str, after: str = "") -> list[list[str]]:
    """The rows of the first Markdown table after the line `after` whose header starts with `first_header` (header
    row included)."""
    lines = markdown.splitlines()
    begin = lines.index(after) if after else 0
    start = next(i for i, ln in enumerate(lines) if i > begin and ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        if not ln.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]])
    return rows


def test_one_run_page_numbers_equal_metrics_jsonl(two_runs, tmp_path):
    run = two_runs[0]
    written = write_report([str(run)], str(tmp_path / "page.md"))
    md = written["markdown"].read_text(encoding="utf-8")
    merged = read_metrics(run)
    evals = {k: [(s, v[k]) for s, v in sorted(merged.items()) if k in v]
             for k in {k for v in merged.values() for k in v if k.startswith("eval/")}}
    rows = {r[0]: r for r in table(md, "metric")[1:]}
    assert set(rows) == {k.removeprefix("eval/") for k in evals}
    for key, points in evals.items():
        low = key in ("eval/dev_loss", "eval/parse_failures")
        best_step, best = (min if low else max)(points, key=lambda p: p[1])
        row = rows[key.removeprefix("eval/")]
        assert row[1] == f"**{fmt(best)}**" and row[2] == f"{best_step:,}"
        assert row[3] == fmt(points[-1][1]) and row[4] == f"{points[-1][0]:,}"
    dev_labels = [ln.split(",")[-2] for ln in (ROOT / "data/sample/dev.csv").read_text().splitlines()[1:9]]
    majority = max(dev_labels.count("0"), dev_labels.count("1")) / 8
    assert f"majority_accuracy {fmt(majority)}" in rows["accuracy"][6]

    time_rows = dict((r[0], r[1]) for r in table(md, "", after="## Time")[1:])
    tps = [v["tokens_per_s"] for v in merged.values() if "tokens_per_s" in v]
    assert time_rows["tokens/s (mean of logged)"] == fmt(sum(tps) / len(tps), 0)
    assert time_rows["steps"] == "6"
    info = json.loads((run / "run_info.json").read_text())
    assert time_rows["steps/s"] == fmt(6 / info["invocations"][0]["wall_s"], 3)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert time_rows["checkpoints"].startswith(f"{len(checkpoints)} ({', '.join(checkpoints)})")

    data_rows = {r[0]: r for r in table(md, "split")[1:]}
    n_train = len((ROOT / "data/sample/train.csv").read_text().splitlines()) - 1
    assert data_rows["train"][2] == f"{n_train:,}" and data_rows["train"][6] == "written"
    assert info["data"]["train"]["tokens"] > 0 and data_rows["train"][4] == f"{info['data']['train']['tokens']:,}"
    assert "**finished**" in md and "![loss and learning rate](page_files/curves.png)" in md
    assert {p.name for p in written["figures"]} == {"curves.png", "eval_metrics.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written["figures"])


def test_comparison_table_holds_the_real_differences_and_marks_the_best(two_runs, tmp_path):
    a, b = two_runs
    ca, cb = (json.loads((r / "run_config.json").read_text()) for r in (a, b))
    real = sorted(k for k in ca if ca[k] != cb[k] and k != "out_dir")
    assert real == ["learning_rate", "warmup_steps"]
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"accuracy": 0.625, "per_class": {"0": {"f1": 0.5}}, "rows": 200}))
    md = write_report([str(a), str(b)], str(tmp_path / "cmp.md"), [f"Dev scores={scores}"])["markdown"].read_text()
    assert table(md, "result", after="## Dev scores")[1:] == [["accuracy", "0.6250"], ["per_class.0.f1", "0.5000"],
                                                              ["rows", "200"]]
    header, *rows = table(md, "run")
    assert header[2:2 + len(real)] == real
    col = header.index("dev_loss final")
    finals = [read_metrics(r)[6]["eval/dev_loss"] for r in (a, b)]
    winner = finals.index(min(finals))
    assert rows[winner][col] == f"**{fmt(finals[winner])}**" and rows[1 - winner][col] == fmt(finals[1 - winner])


def test_runs_of_different_tasks_compare_on_their_common_fields(two_runs, tmp_path):
    """A run directory of another task (its files as a run writes them): only the fields both configs have count."""
    other = tmp_path / "ranking_run"
    other.mkdir()
    cfg = {**json.loads((two_runs[0] / "run_config.json").read_text()), "task": "ranking", "rank_loss": "ce"}
    del cfg["prompt_template"]
    cfg["learning_rate"] = 5e-4
    (other / "run_config.json").write_text(json.dumps(cfg))
    (other / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 5e-4}) + "\n"
                                                 for s in range(1, 4)) + '{"step": 4, "lo')  # torn by a kill
    md = write_report([str(two_runs[0]), str(other)], str(tmp_path / "cmp.md"))["markdown"].read_text()
    header, *rows = table(md, "run")
    assert header[2:] == ["learning_rate", "task", "wall time"]  # no evaluation metric in common
    assert rows[1][:4] == ["ranking_run", "unfinished", "0.0005", "ranking"]


def test_killed_run_is_reported_as_killed_with_its_config_origin(tiny_model_dir, tmp_path):
    """A real `python -m app train` killed with SIGKILL mid-run: the report says killed, shows the steps it logged,
    and marks the fields configs/tiny.py and the command line changed from its base (configs/default.py)."""
    out = tmp_path / "killed"
    args = tiny_args(tiny_model_dir, out, max_steps=400, save_every=1000, log_every=1, tensorboard=False)
    proc = subprocess.Popen([sys.executable, "-m", "app", "train", "configs/tiny.py", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = collect.load_run(out)
    assert run.status == "killed" and run.last_step >= 3
    changed = run.info["config_origin"]["changed"]
    assert changed["dtype"]["base"] == "bfloat16" and changed["dtype"]["set_at"] == "configs/tiny.py:11"
    assert changed["max_steps"]["set_at"] == "command line"
    assert "batch_size" not in changed  # tiny.py sets 16, as default.py does
    r = run_app("report", str(out))
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "**killed**" in md and "| dtype | **float32** | base (default.py): 'bfloat16'" in md


@pytest.mark.parametrize("case", ["missing", "not_md", "a_directory", "into_checkpoints", "attach_missing"])
def test_bad_arguments_are_one_line_and_write_nothing(case, two_runs, tmp_path):
    run = two_runs[0]
    (tmp_path / "folder.md").mkdir()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    args = {"missing": [str(tmp_path / "nope")], "not_md": [str(run), f"--output={tmp_path / 'r.txt'}"],
            "a_directory": [str(run), f"--output={tmp_path / 'folder.md'}"],
            "into_checkpoints": [str(run), f"--output={run / 'checkpoints' / 'r.md'}"],
            "attach_missing": [str(run), f"--output={tmp_path / 'r.md'}", f"--attach=x={tmp_path / 'no.json'}"]}[case]
    r = run_app("report", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.md"]


def test_html_page_in_headless_chromium(two_runs, tmp_path):
    """The comparison page opens in a real browser: tables render, every inlined figure decodes."""
    from test_demo import Chromium, find_browser

    exe = find_browser()
    if exe is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium); the browser test needs one")
    written = write_report([str(p) for p in two_runs], str(tmp_path / "cmp.md"))
    browser = Chromium(exe, tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=written["html"].resolve().as_uri())
        browser.wait_for("document.readyState === 'complete' && document.images.length > 0")
        assert browser.js("[...document.images].every(i => i.complete && i.naturalWidth > 400)")
        assert browser.js("document.querySelectorAll('td.best').length") >= 1
        assert browser.js("document.querySelector('h1').textContent") == "Comparison of 2 runs"
        browser.screenshot(ARTIFACTS / "report_comparison.png")
    finally:
        browser.close()
    assert (ARTIFACTS / "report_comparison.png").stat().st_size > 10_000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
