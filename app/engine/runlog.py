"""The run log: metrics.jsonl (one line per step and per evaluation), TensorBoard and W&B; rank 0 only.

On resume, metrics.jsonl is cut back to the checkpoint's step (atomically); a line torn by a kill is dropped. The file
is read back by one reader, app.metrics.plots.read_metrics (here, for the curves and for the model card).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from app.atomic import write_atomic
from app.config import Config
from app.metrics.plots import read_metrics
from app.packages import missing

log = logging.getLogger(__name__)


def trim_metrics(path: Path, resume_step: int) -> None:
    """Keep the lines up to `resume_step` (a killed run wrote more after its last checkpoint), drop torn ones."""
    records = read_metrics(path)
    written = sum(1 for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
    if written > len(records):
        log.warning("%s: dropped %d unreadable line(s) (torn by a kill while written)", path, written - len(records))
    write_atomic(path, "".join(_line(r) for r in records if r["step"] <= resume_step))


def _line(record: dict) -> str:
    return json.dumps(record) + "\n"


class RunLog:
    """metrics.jsonl (one line per step and per eval) + optional TensorBoard and W&B; rank 0 only."""

    def __init__(self, cfg: Config, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = cfg.out_path / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if self.path.exists():
            trim_metrics(self.path, resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if cfg.tensorboard:
            self.tb = SummaryWriter(str(cfg.out_path / "tensorboard"))
        if cfg.wandb:
            try:  # wandb is an optional extra
                import wandb
            except ImportError:
                raise missing("wandb", "wandb=True", "--wandb=False (metrics.jsonl and TensorBoard are always written)") from None
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(cfg.out_path), config=cfg.model_dump(),
                                    resume="allow", id=cfg.out_path.resolve().name)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(_line({"step": step, **values}))
        self.file.flush()
        for k, v in values.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
