"""Confidence tokens: tag (answer raw QA rows with the model, append <C_…>/<U_…>), train, calibration (infer on a
validation file with answers: predictions with `confidence` and the calibration metrics beside them).

tiny: the bundled synthetic BoolQ-style rows tagged by the tiny model, configs/confidence_tokens_tiny.py, calibration on
the synthetic MedQA-style rows. full: raw BoolQ rows (data/confidence/boolq_train.jsonl) tagged by the base model of
configs/confidence_tokens.py, trained, calibrated on data/confidence/boolq_dev.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from app.pipelines.common import ROOT, predict, report, tiny_model, train
from app.pipelines.steps import Pipeline, Step


def build(scale: str, work: Path, data: Path | None = None) -> Pipeline:
    return tiny(work) if scale == "tiny" else full(work, data or ROOT / "data" / "confidence")


def _calibration(work: Path, run: Path, validation: Path, expect_s: float) -> Step:
    return predict("calibration", ["infer"], validation, run, work / "calibration.csv", expect_s)


def tiny(work: Path) -> Pipeline:
    data, run, base = work / "data", work / "run", work / "base"
    config = "configs/confidence_tokens_tiny.py"
    validation = f"--validation_files={{'boolq': '{data / 'dev_boolq.jsonl'}', 'medqa': '{data / 'dev_medqa.jsonl'}'}}"
    steps = [
        Step("sample-data", ["sample-data", "confidence_tokens", str(data)], [],
             [data / "train.jsonl", data / "dev_boolq.jsonl", data / "dev_medqa.jsonl"], 3),
        tiny_model(work),
        Step("tag", ["tag", str(data / "dev_boolq.jsonl"), f"--output={work / 'tagged.jsonl'}", "--dataset=boolq",
                     f"--config={config}", f"--model_name={base}", "--create_tiny_model=False"],
             [data / "dev_boolq.jsonl", base / "model.safetensors"], [work / "tagged.jsonl"], 15),
        train("train", config, run, [work / "tagged.jsonl"], 40, f"--train_file={work / 'tagged.jsonl'}", validation,
              "--batch_size=8", "--micro_batch_size=8", "--max_steps=24", "--eval_every=12", "--save_every=12",
              "--tensorboard=False", tiny_base=base),
        _calibration(work, run, data / "dev_medqa.jsonl", 15),
        report(work, run, attach={"Calibration": work / "calibration.metrics.json"}),
    ]
    return Pipeline("confidence_tokens", "tiny", work, steps)


def full(work: Path, data: Path) -> Pipeline:
    run = work / "run"
    config = "configs/confidence_tokens.py"
    steps = [
        Step("tag", ["tag", str(data / "boolq_train.jsonl"), f"--output={work / 'tagged.jsonl'}", "--dataset=boolq",
                     f"--config={config}"], [data / "boolq_train.jsonl"], [work / "tagged.jsonl"], 1800),
        train("train", config, run, [work / "tagged.jsonl"], 2 * 3600, f"--train_file={work / 'tagged.jsonl'}"),
        _calibration(work, run, data / "boolq_dev.jsonl", 600),
        report(work, run, attach={"Calibration": work / "calibration.metrics.json"}),
    ]
    return Pipeline("confidence_tokens", "full", work, steps, notes="full: a GPU; times are estimates")
