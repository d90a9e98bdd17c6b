"""Dev loss of the lookahead experiment's MiniGPT baseline after S optimizer steps, over seeds.

    python tests/bench/lookahead_baseline.py [--config configs/lookahead_tiny.py] [--steps 300 3000]
                                             [--seeds 42 123 456] [--threads 1] [--json OUT] [KEY=VALUE ...]

For every (steps, seed): one ordinary engine run of the plain model (`lookahead_model=plain`, the config's corpus,
batch, learning rate and warm-up; the cosine schedule ends at `steps`), then its final checkpoint is evaluated on the
whole dev text as the experiment evaluates it (`app.tasks.lookahead.task.evaluate_model`: cross-entropy at every
position of every dev chunk, in nats per byte). Prints one line per run and, per step count, the mean and sample
standard deviation over the seeds. Extra `KEY=VALUE` arguments override config fields of every run.

To compare two versions of the project, run the same script against each checkout (the script imports `app` from
the first entry of PYTHONPATH and reads the config and corpus from that checkout):

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before .venv/bin/python tests/bench/lookahead_baseline.py --json before.json
    .venv/bin/python tests/bench/lookahead_baseline.py --json after.json

Runs write to a temporary directory, removed at the end. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/lookahead_tiny.py", help="relative to the checkout of `app`")
    p.add_argument("--steps", type=int, nargs="+", default=[300, 3000])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 456])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every run's figures here")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for every run")
    return p.parse_args()


def checkout_root() -> Path:
    """The checkout whose `app` package is imported (configs and the corpus are read from it)."""
    import app

    return Path(app.__file__).resolve().parents[1]


def train_command():
    """The train command's function: app.train.train, or app.engine.loop.train in checkouts older than it (the script
    compares versions)."""
    try:
        from app.train import train
    except ImportError:
        from app.engine.loop import train
    return train


def train_and_evaluate(config: str, steps: int, seed: int, overrides: list[str], out_dir: Path) -> dict:
    from app.config import load_config
    from app.tasks.lookahead.experiment import final_evaluation

    train = train_command()

    args = [f"--{kv}" for kv in overrides] + [
        "--lookahead_model=plain", f"--seed={seed}", f"--max_steps={steps}", f"--eval_every={steps}",
        f"--save_every={steps}", f"--log_every={min(steps, 50)}", f"--out_dir={out_dir}"]
    cfg = load_config(config, args)
    start = time.perf_counter()
    if train(cfg) != 0:
        raise SystemExit(f"run steps={steps} seed={seed} failed")
    seconds = time.perf_counter() - start
    final = final_evaluation(cfg)
    return {"steps": steps, "seed": seed, "dev_loss": final["eval_lm_loss"], "perplexity": final["perplexity"],
            "parameters": final["parameters"]["total"], "train_seconds": seconds}


def summary(runs: list[dict], steps: int) -> str:
    losses = [r["dev_loss"] for r in runs if r["steps"] == steps]
    spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
    return f"steps={steps}: dev loss {statistics.mean(losses):.4f} +/- {spread:.4f} nats/byte over {len(losses)} seeds"


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    root = checkout_root()
    os.chdir(root)  # the configs name the corpus relative to the checkout
    print(f"checkout {root}, config {args.config}, overrides {args.overrides or 'none'}", file=sys.stderr)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lookahead-baseline-") as scratch:
        for steps in args.steps:
            for seed in args.seeds:
                run = train_and_evaluate(args.config, steps, seed, args.overrides, Path(scratch) / f"s{steps}_{seed}")
                runs.append(run)
                print(f"steps={steps} seed={seed}: dev loss {run['dev_loss']:.4f} (perplexity {run['perplexity']:.3f},"
                      f" {run['parameters']:,} parameters, {run['train_seconds']:.0f} s)", flush=True)
    for steps in args.steps:
        print(summary(runs, steps))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkout": str(root), "config": args.config,
                                               "overrides": args.overrides, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
