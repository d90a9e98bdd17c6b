"""Candidate ranking (FinQA): ranking prepare, candidates, rewards, train, rank.

tiny: the shared FinQA fixture (../shared/fixtures/finqa/train_sample.json, 20 records; `--data FILE` for another)
through the data steps, the tiny model trained on those questions and ranking them again (the mechanics, not
generalisation). full: data/finqa/train.json and dev.json, configs/ranking.py (Qwen3-8B LoRA) on one GPU.
"""

from __future__ import annotations

from pathlib import Path

from app.pipelines.common import ROOT, SHARED_FIXTURES, predict, report, tiny_model, train
from app.pipelines.steps import Pipeline, Step


def build(scale: str, work: Path, data: Path | None = None) -> Pipeline:
    if scale == "tiny":
        return tiny(work, data or SHARED_FIXTURES / "finqa" / "train_sample.json")
    return full(work, data or ROOT / "data" / "finqa")


def _data_steps(src: Path, out: Path, split: str, config: str, expect_s: float) -> list[Step]:
    files = [src, out / f"{split}.prepared.jsonl", out / f"{split}.candidates.jsonl", out / f"{split}.rewards.jsonl"]
    return [Step(f"{kind}-{split}", ["ranking", kind, str(a), str(b), f"--config={config}"], [a, ROOT / config], [b],
                 expect_s) for kind, a, b in zip(("prepare", "candidates", "rewards"), files, files[1:])]


def _rank(work: Path, run: Path, src: Path, expect_s: float) -> Step:
    return predict("rank", ["ranking", "rank"], src, run, work / "rankings.jsonl", expect_s)


def tiny(work: Path, finqa: Path) -> Pipeline:
    config, data, run = "configs/ranking_tiny.py", work / "data", work / "run"
    rewards = data / "train.rewards.jsonl"
    steps = [
        *_data_steps(finqa, data, "train", config, 4),
        tiny_model(work),
        train("train", config, run, [rewards], 30, f"--train_file={rewards}", f"--dev_file={rewards}",
              "--max_seq_length=256", "--batch_size=4", "--micro_batch_size=4", "--max_steps=10", "--eval_every=5",
              "--save_every=5", "--tensorboard=False", tiny_base=work / "base"),
        _rank(work, run, rewards, 10),
        report(work, run, attach={"Rankings": work / "rankings.metrics.json"}),
    ]
    return Pipeline("ranking", "tiny", work, steps)


def full(work: Path, finqa: Path) -> Pipeline:
    config, data, run = "configs/ranking.py", work / "data", work / "run"
    steps = [
        *_data_steps(finqa / "train.json", data, "train", config, 60),
        *_data_steps(finqa / "dev.json", data, "dev", config, 10),
        train("train", config, run, [data / "train.rewards.jsonl", data / "dev.rewards.jsonl"], 5 * 3600,
              f"--train_file={data / 'train.rewards.jsonl'}", f"--dev_file={data / 'dev.rewards.jsonl'}"),
        _rank(work, run, data / "dev.rewards.jsonl", 1200),
        report(work, run, attach={"Rankings": work / "rankings.metrics.json"}),
    ]
    return Pipeline("ranking", "full", work, steps, notes="full: a GPU; times are estimates")
