"""The run log: metrics.jsonl (one line per step and per evaluation), TensorBoard and W&B; rank 0 only.

On resume, metrics.jsonl is cut back to the checkpoint's step (atomically); a line torn by a kill is dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from app.atomic import write_atomic
from app.config import Config
from app.packages import missing

log = logging.getLogger(__name__)


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line that does not parse (torn by a kill while it was written)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    step = entry.get("step") if isinstance(entry, dict) else None
    return step if isinstance(step, int) else None


def trim_metrics(path: Path, resume_step: int) -> None:
    """Keep the lines up to `resume_step` (a killed run wrote more after its last checkpoint), drop torn ones."""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    steps = [_step_of(ln) for ln in lines]
    torn = steps.count(None)
    if torn:
        log.warning("%s: dropped %d unreadable line(s) (torn by a kill while written)", path, torn)
    write_atomic(path, "".join(ln + "\n" for ln, s in zip(lines, steps) if s is not None and s <= resume_step))


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
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(cfg.out_path / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise missing("wandb", "wandb=True", "--wandb=False (metrics.jsonl and TensorBoard are always written)") from None
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(cfg.out_path), config=cfg.model_dump(),
                                    resume="allow", id=cfg.out_path.resolve().name)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
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
