"""Optimizer and learning-rate schedule from the config: AdamW (fused where it can be) or a bitsandbytes variant."""

from __future__ import annotations

import math

import torch

from app.config import Config
from app.packages import missing


def make_optimizer(cfg: Config, groups: list[dict]):
    """The optimizer over the task's parameter groups (each group may set its own lr / weight_decay)."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer == "adamw":
        # the fused kernel does the whole update in one pass (CPU and CUDA); same state, same results
        fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) and p.device.type in ("cpu", "cuda")
                    for p in params)
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise missing("bitsandbytes", f"optimizer={cfg.optimizer!r}") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[cfg.optimizer]
    return cls(groups, **kwargs)


def make_scheduler(cfg: Config, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
