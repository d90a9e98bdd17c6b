"""Confidence head: steps convert (step files -> generic step JSONL), train, score-steps.

tiny: the bundled synthetic step set (converted as generic files), configs/confidence_head_tiny.py. full: PRM800K
phase 2 files (data/prm800k/phase2_train.jsonl, phase2_test.jsonl) and configs/confidence_head_full.py.
"""

from __future__ import annotations

from pathlib import Path

from app.pipelines.common import ROOT, predict, report, tiny_model, train
from app.pipelines.steps import Pipeline, Step


def build(scale: str, work: Path, data: Path | None = None) -> Pipeline:
    return tiny(work) if scale == "tiny" else full(work, data or ROOT / "data" / "prm800k")


def _convert(name: str, src: Path, out: Path, fmt: str, expect_s: float) -> Step:
    return Step(name, ["steps", "convert", str(src), str(out), f"--format={fmt}"], [src], [out], expect_s)


def _score(work: Path, run: Path, dev: Path, expect_s: float) -> Step:
    return predict("score-steps", ["score-steps"], dev, run, work / "step_scores.jsonl", expect_s)


def tiny(work: Path) -> Pipeline:
    raw, data, run = work / "raw", work / "data", work / "run"
    steps = [
        Step("sample-data", ["steps", "synthetic", str(raw)], [], [raw / "train.jsonl", raw / "dev.jsonl"], 3),
        _convert("convert-train", raw / "train.jsonl", data / "train.jsonl", "generic", 3),
        _convert("convert-dev", raw / "dev.jsonl", data / "dev.jsonl", "generic", 3),
        tiny_model(work),
        train("train", "configs/confidence_head_tiny.py", run, [data / "train.jsonl", data / "dev.jsonl"], 30,
              f"--train_file={data / 'train.jsonl'}", f"--dev_file={data / 'dev.jsonl'}", "--num_epochs=1",
              "--eval_every=25", "--save_every=25", "--tensorboard=False", tiny_base=work / "base"),
        _score(work, run, data / "dev.jsonl", 10),
        report(work, run, attach={"Step scores": work / "step_scores.metrics.json"}),
    ]
    return Pipeline("confidence_head", "tiny", work, steps)


def full(work: Path, data: Path) -> Pipeline:
    steps_dir, run = work / "steps", work / "run"
    steps = [
        _convert("convert-train", data / "phase2_train.jsonl", steps_dir / "train.jsonl", "prm800k", 120),
        _convert("convert-dev", data / "phase2_test.jsonl", steps_dir / "dev.jsonl", "prm800k", 10),
        train("train", "configs/confidence_head_full.py", run, [steps_dir / "train.jsonl", steps_dir / "dev.jsonl"],
              6 * 3600, f"--train_file={steps_dir / 'train.jsonl'}", f"--dev_file={steps_dir / 'dev.jsonl'}"),
        _score(work, run, steps_dir / "dev.jsonl", 900),
        report(work, run, attach={"Step scores": work / "step_scores.metrics.json"}),
    ]
    return Pipeline("confidence_head", "full", work, steps, notes="full: a GPU; times are estimates")
