"""Lookahead: the seeds experiment (MiniGPT against ConfidenceAwareGPT, each seed an engine run), then the comparison
report of its runs.

tiny: configs/lookahead_tiny.py cut to 2 seeds x 30 steps on the first 100k characters. full: configs/lookahead.py.
"""

from __future__ import annotations

from pathlib import Path

from app.pipelines.common import ROOT, report
from app.pipelines.steps import Pipeline, Step


def build(scale: str, work: Path, data: Path | None = None) -> Pipeline:
    corpus = data or ROOT / "data" / "lookahead" / "shakespeare.txt"
    config = "configs/lookahead_tiny.py" if scale == "tiny" else "configs/lookahead.py"
    runs, results = work / "runs", work / "results"
    cut = ["--max_steps=30", "--experiment_seeds=[42, 123]", "--corpus_chars=100000", "--eval_every=15",
           "--save_every=15", "--eval_rows=40", "--calibration_points=500"] if scale == "tiny" else []
    experiment = Step("experiment", ["experiment", config, f"--results-dir={results}", f"--out_dir={runs}",
                                     f"--corpus_file={corpus}", *cut], [ROOT / config, corpus], [results],
                      60 if scale == "tiny" else 6 * 3600)
    steps = [experiment, report(work, runs, inputs=[results])]
    notes = "" if scale == "tiny" else "full: a GPU; times are estimates"
    return Pipeline("lookahead", scale, work, steps, notes=notes)
