"""`python -m app train CONFIG.py`: the engine (app.engine.loop) on the config's task, and what the command adds to
the run directory around it:

  the tiny base model    built where `model_name` points when the config asks for it (create_tiny_model)
  data_sources.json      beside run_config.json: each data file's path or Hub id, revision and fingerprint
  README.md              the model card of the final and best checkpoints (what the task says it is: Task.model_card)
  training_curves.png    next to metrics.jsonl (matplotlib, when installed); never fails the run
  run_info.json          environment, config origin, data, invocations; warnings.log (app.report.runinfo)
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.checkpoint import write_json
from app.config import Config
from app.engine import loop
from app.metrics.plots import save_training_curves
from app.modelcard import write_model_card
from app.registry import get_task
from app.report.runinfo import RunRecord, close_run_record
from app.runs import ensure_base_model
from app.sources import run_sources

log = logging.getLogger(__name__)


def write_training_curves(out_dir: Path) -> None:
    """training_curves.png next to metrics.jsonl (matplotlib, when installed); never fails the run."""
    try:
        save_training_curves(out_dir)
    except Exception as err:  # a plot must never cost a finished run
        log.warning("training curves not written: %s: %s", type(err).__name__, err)


class CommandHooks(loop.RunHooks):
    """The train command's files in the run directory, written at the engine's hook points."""

    def __init__(self):
        self.record: RunRecord | None = None  # run_info.json + warnings.log, read by `python -m app report`

    def before_model(self, cfg: Config) -> None:
        ensure_base_model(cfg)

    def on_run_dir(self, run: loop.Run) -> None:
        write_json(run.cfg.out_path / "data_sources.json", run_sources(run.cfg))
        self.record = RunRecord.start(run.cfg, run.world, run.sharded)

    def on_data(self, run: loop.Run) -> None:
        self.record.data(run.features, run.dev_features, run.plan, len(run.train_rows), len(run.dev_rows))

    def on_checkpoint(self, run: loop.Run, name: str, directory: Path) -> None:
        if name == "final" or name.startswith("best"):
            write_model_card(directory, run.cfg, name, run.state.step, run.task.model_card(run.cfg))

    def on_finish(self, run: loop.Run) -> None:
        write_training_curves(run.cfg.out_path)
        self.record.finish(run.state.step, run.state.total_steps, run.stop.signum)

    def close(self) -> None:
        close_run_record()


def train(cfg: Config, task=None) -> int:
    """Run (or resume) the training of `cfg` with its task (or `task`, an instance of the protocol standing in for
    it); returns the process exit code."""
    return loop.train(cfg, task if task is not None else get_task(cfg.task), CommandHooks())
