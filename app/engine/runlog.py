"""The run log: metrics.jsonl (one line per step and per evaluation), TensorBoard and W&B; rank 0 only."""

from __future__ import annotations

import json

from app.config import Config
from app.errors import UserError


class RunLog:
    """metrics.jsonl (one line per step and per eval) + optional TensorBoard and W&B; rank 0 only."""

    def __init__(self, cfg: Config, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = cfg.out_path / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if self.path.exists():  # drop lines a killed run wrote after its last checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.file = open(self.path, "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(cfg.out_path / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb=True needs the wandb package: pip install wandb") from None
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
