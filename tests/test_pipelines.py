"""`python -m app pipeline NAME`: each experiment end to end at tiny scale, skipped steps when up to date, a killed
pipeline resuming without redoing finished steps, and the full scale's dry run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, run_app

from app.pipelines import PIPELINES, build
from app.pipelines.steps import STAMPS, Pipeline, Step, run_pipeline


def outputs_state(pipeline: Pipeline) -> dict[str, int]:
    """mtime_ns of every output of every step."""
    return {str(p): p.stat().st_mtime_ns for s in pipeline.steps for p in s.outputs if p.is_file()}


def assert_rerun_does_nothing(name: str, work: Path) -> None:
    pipeline = build(name, "tiny", work)
    before = outputs_state(pipeline)
    r = run_app("pipeline", name, f"--workdir={work}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(": up to date") == len(pipeline.steps), r.stdout
    assert outputs_state(pipeline) == before


def run_tiny(name: str, work: Path) -> subprocess.CompletedProcess:
    r = run_app("pipeline", name, f"--workdir={work}", timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    md = (work / "report.md").read_text(encoding="utf-8")
    assert "**finished**" in md or "| finished |" in md  # one run's page, or the comparison of several
    assert (work / "report.html").is_file()
    return r


# --- the runner ---------------------------------------------------------------------------------------------------
def test_a_step_runs_again_only_when_its_inputs_or_outputs_changed(tmp_path):
    src, mid, out = tmp_path / "in.txt", tmp_path / "mid.txt", tmp_path / "out.txt"
    src.write_text("3")
    calls: list[str] = []

    def double(a: Path, b: Path, name: str):
        def run():
            calls.append(name)
            b.write_text(str(2 * int(a.read_text())))
        return run

    steps = [Step("first", None, [src], [mid], 1, run=double(src, mid, "first"), describe="double"),
             Step("second", None, [mid], [out], 1, run=double(mid, out, "second"), describe="double")]
    pipeline = Pipeline("t", "tiny", tmp_path / "work", steps)
    quiet = lambda *_: None  # noqa: E731
    run_pipeline(pipeline, quiet)
    assert calls == ["first", "second"] and out.read_text() == "12"
    run_pipeline(pipeline, quiet)
    assert calls == ["first", "second"]  # everything up to date
    out.unlink()
    run_pipeline(pipeline, quiet)
    assert calls == ["first", "second", "second"]  # only the step whose output went
    time.sleep(0.01)
    src.write_text("5")
    run_pipeline(pipeline, quiet)
    assert calls[3:] == ["first", "second"] and out.read_text() == "20"
    assert sorted(p.name for p in (tmp_path / "work" / STAMPS).iterdir()) == ["01-first.json", "02-second.json"]


def test_full_scale_dry_run_prints_every_step_and_writes_nothing(tmp_path):
    for name in PIPELINES:
        work = tmp_path / name
        r = run_app("pipeline", name, "--scale=full", "--dry-run", f"--workdir={work}")
        assert r.returncode == 0, r.stderr
        steps = build(name, "full", work).steps
        lines = [ln for ln in r.stdout.splitlines() if ln[:3].strip().rstrip(".").isdigit()]
        assert len(lines) == len(steps)
        for line, step in zip(lines, steps):
            assert step.name in line and "to run" in line and "~" in line
            assert ("python -m app " + step.args[0]) in line if step.args else step.describe in line
        assert "expected time of the steps to run" in r.stdout
        assert not work.exists()
    assert "missing input: " in run_app("pipeline", "nli_cot", "--scale=full", "--dry-run",
                                        f"--workdir={tmp_path / 'w'}").stdout


def test_served_teacher_reads_a_cot_request_as_the_prompt_it_was_trained_on(tiny_model_dir, tmp_path):
    """The tiny NLI pipeline's chat template turns the cot generate messages (premise and hypothesis in XML tags)
    into exactly the training prompt, BOS included; a message without the tags passes as it is."""
    import shutil

    from transformers import AutoTokenizer

    from app.config import load_config
    from app.pipelines.nli_cot import write_serve_model
    from app.tasks.nli_cot.datagen import prompts as P

    final = tmp_path / "teacher" / "checkpoints" / "final"
    shutil.copytree(tiny_model_dir, final)
    cfg = load_config(ROOT / "configs/tiny.py")
    (final / "run_config.json").write_text(json.dumps(cfg.model_dump()))
    write_serve_model(tmp_path / "teacher", tmp_path / "serve")
    tok = AutoTokenizer.from_pretrained(tmp_path / "serve")
    user = P.prompt_set(load_datagen_cfg())["generate_user"]
    message = user.replace("$premise", "Ben is reading in the park.").replace("$hypothesis", "Ben is outdoors.")
    text = tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": message}],
                                   tokenize=False)
    assert text == tok.bos_token + cfg.prompt_template.format(premise="Ben is reading in the park.",
                                                              hypothesis="Ben is outdoors.")
    assert tok.apply_chat_template([{"role": "user", "content": "fix it"}], tokenize=False) == tok.bos_token + "fix it"


def load_datagen_cfg():
    from app.tasks.nli_cot.datagen.config import load_datagen_config

    return load_datagen_config(None, [])


# --- the pipelines at tiny scale ----------------------------------------------------------------------------------
def test_killed_pipeline_resumes_without_redoing_finished_steps(tmp_path):
    """confidence_head tiny, killed (the whole process group, with the running training) once the data steps are done
    and the training has started; the re-run skips those steps, finishes, and a third run does nothing."""
    work = tmp_path / "w"
    pipeline = build("confidence_head", "tiny", work)
    proc = subprocess.Popen([sys.executable, "-m", "app", "pipeline", "confidence_head", f"--workdir={work}"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (work / "run" / "run_info.json").is_file():  # the training step is under way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stamps = sorted(p.name for p in (work / STAMPS).iterdir())
    assert stamps == ["01-sample-data.json", "02-convert-train.json", "03-convert-dev.json", "04-tiny-model.json"]
    finished = {str(p): p.stat().st_mtime_ns for s in pipeline.steps[:4] for p in s.outputs}
    assert not (work / "run" / "checkpoints" / "final").exists()

    r = run_tiny("confidence_head", work)
    for i, step in enumerate(pipeline.steps[:4], 1):
        assert f"[{i}/7] {step.name}: up to date" in r.stdout
    assert {p: Path(p).stat().st_mtime_ns for p in finished} == finished
    scores = [json.loads(ln) for ln in (work / "step_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 100  # every dev solution scored
    assert_rerun_does_nothing("confidence_head", work)


@pytest.mark.slow
def test_confidence_tokens_pipeline(tmp_path):
    run_tiny("confidence_tokens", tmp_path / "w")
    metrics = json.loads((tmp_path / "w" / "calibration.metrics.json").read_text())
    assert metrics["rows"] == 48
    assert_rerun_does_nothing("confidence_tokens", tmp_path / "w")


@pytest.mark.slow
def test_ranking_pipeline(tmp_path):
    if not (SHARED / "finqa" / "train_sample.json").is_file():
        pytest.skip(f"{SHARED}/finqa/train_sample.json not present (the tiny ranking pipeline's input)")
    run_tiny("ranking", tmp_path / "w")
    ranked = (tmp_path / "w" / "rankings.jsonl").read_text().splitlines()
    prepared = (tmp_path / "w" / "data" / "train.prepared.jsonl").read_text().splitlines()
    assert len(ranked) == len(prepared) > 0
    assert_rerun_does_nothing("ranking", tmp_path / "w")


@pytest.mark.slow
def test_lookahead_pipeline(tmp_path):
    run_tiny("lookahead", tmp_path / "w")
    md = (tmp_path / "w" / "report.md").read_text()
    assert md.startswith("# Comparison of 4 runs") and md.count("| finished |") == 4
    assert_rerun_does_nothing("lookahead", tmp_path / "w")


@pytest.mark.slow
def test_nli_cot_pipeline_with_a_served_teacher(tmp_path):
    """generate and reflect go through `transformers serve` on the tiny teacher; the student trains on what combine
    kept, and the server is gone at the end."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"transformers serve needs {', '.join(missing)}")
    work = tmp_path / "w"
    run_tiny("nli_cot", work)
    generated = (work / "cot" / "generated.csv").read_text().splitlines()
    combined = (work / "cot" / "train.csv").read_text().splitlines()
    assert len(generated) == 25 and len(combined) > 1  # 24 rows asked; at least one kept
    scores = json.loads((work / "dev_scores.json").read_text())
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert (work / "serve.log").read_text().count("POST /v1/chat/completions") >= 24  # through the real server
    assert_rerun_does_nothing("nli_cot", work)
