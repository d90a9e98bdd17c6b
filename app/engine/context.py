"""What an evaluation knows besides the model (the engine builds it, a task's `evaluate` reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class EvalContext:
    """What an evaluation knows besides the model: where it is in the run and the loss module being trained."""

    step: int
    epoch: int  # completed epochs
    steps_per_epoch: int
    out_dir: Path
    objective: nn.Module | None = None
    device: torch.device = torch.device("cpu")

    @property
    def end_of_epoch(self) -> bool:
        return self.steps_per_epoch > 0 and self.step % self.steps_per_epoch == 0
