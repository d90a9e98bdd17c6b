"""Wall time of `python -m app report` on a 500-step run, and of each tiny pipeline end to end and re-run.

    .venv/bin/python tests/bench/report_speed.py [--run DIR] [--pipelines nli_cot,ranking,...] [--repeat 3]

report: `python -m app report RUN` as a user runs it (a fresh process: imports, reading, figures, Markdown, HTML),
median of --repeat runs, against the baseline of the same process drawing only the run's training_curves.png (what
every training run already does when it ends). The run is --run (default checkpoints/tiny, the 500-step run of
`./run_training.sh configs/tiny.py`; trained here when missing).

pipelines: each one from an empty work directory (the first step to the report), then the same command again with
everything up to date, against the baseline of `python -m app --help` (the start-up every command pays).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


CPU_S: list[float] = []  # CPU seconds (user + system) of each timed command: on a loaded machine wall time swings


def timed(argv: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_S.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def app(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", *args]


def median_of(argv: list[str], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `repeat` runs."""
    walls = [timed(argv) for _ in range(repeat)]
    return statistics.median(walls), statistics.median(CPU_S[-repeat:])


def bench_report(run: Path, repeat: int) -> None:
    if not (run / "checkpoints" / "final").is_dir():
        print(f"training the 500-step run in {run} (configs/tiny.py) ...", flush=True)
        timed(app("train", "configs/tiny.py", f"--out_dir={run}"))
    steps = sum(1 for _ in open(run / "metrics.jsonl", encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        curves = median_of([sys.executable, "-c", "import sys; from app.metrics.plots import save_training_curves; "
                            f"save_training_curves({str(run)!r})"], repeat)
        report = median_of(app("report", str(run), f"--output={Path(tmp) / 'report.md'}"), repeat)
        compare = median_of(app("report", str(run), str(run), f"--output={Path(tmp) / 'compare.md'}"), repeat)
    print(f"report of {run} ({steps} metrics lines), median of {repeat}, wall (CPU):")
    for what, (wall, cpu) in (("training_curves.png only (baseline)", curves), ("report (one run)", report),
                              ("report (the run twice: comparison)", compare)):
        print(f"  {what:<36} {wall:6.2f} s ({cpu:5.2f} s)  {wall / curves[0]:.2f}x"
              + ("   target < 2 s" if what.startswith("report (one") else ""))


def bench_pipelines(names: list[str]) -> None:
    start, _ = median_of(app("--help"), 3)
    print(f"pipelines (tiny), baseline python -m app --help: {start:.2f} s")
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        try:
            first = timed(app("pipeline", name, f"--workdir={work}"))
            first_cpu = CPU_S[-1]
            again = timed(app("pipeline", name, f"--workdir={work}"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"  {name:<18} end to end {first:7.1f} s ({first_cpu:.0f} s CPU)   up-to-date re-run {again:5.2f} s "
              f"({again / start:.2f}x --help)   target < 10 s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "checkpoints" / "tiny")
    parser.add_argument("--pipelines", default="confidence_head,ranking,confidence_tokens,lookahead,nli_cot",
                        help="comma-separated; '' for none")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-report", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if not args.skip_report:
        bench_report(args.run, args.repeat)
    names = [n for n in args.pipelines.split(",") if n]
    if names:
        bench_pipelines(names)


if __name__ == "__main__":
    main()
