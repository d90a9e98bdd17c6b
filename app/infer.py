"""`python -m app infer INPUT [--checkpoint DIR] [--output FILE] [--fresh] [--examples N] [--key=value ...]`.

Batched inference of any task that declares a predictor: the checkpoint's task decides what the input holds and what
is written (the NLI task: app/tasks/nli_cot/predict.py; the confidence head: app/tasks/confidence_head/score_steps.py).
The checkpoint choice, its config, the resumable partial output and the order of checks are app/runs.py's.
"""

from __future__ import annotations

from app.runs import run_command, run_predictor


def run(input_path, checkpoint=None, output=None, overrides=(), fresh=False, examples=5, checkpoint_root="checkpoints",
        progress=True) -> dict:
    """Predict every row of `input_path` with the checkpoint's task; write its outputs; return the summary."""
    return run_predictor(input_path, checkpoint, output, overrides, fresh=fresh, examples=examples,
                         root=checkpoint_root, progress=progress)


def run_cli(input_path, checkpoint, output, overrides, fresh=False, examples=5) -> int:
    return run_command(input_path, checkpoint, output, overrides, fresh=fresh, examples=examples)
