"""Model kinds: the model side of a training run. A task names its kind (`Task.model_kind`); the engine asks the kind
how the model loads and saves, how FSDP2 shards it, what a sharded run must change and how the optimizer groups its
parameters.

    method                             CausalLM (Hugging Face, adapters)          a from-scratch model (lookahead's
                                                                                  ScratchGPT, app/tasks/lookahead)
    ------                             ---------------------------------          ---------------------------------
    load(cfg, device, weights_dir)     tokenizer + added tokens, base model or    its own tokenizer and module of
                                       full checkpoint, LoRA (app.lm.modeling)    the config's shape
    save(model, tokenizer, directory)  save_pretrained (safetensors)              its own safetensors files
    shard_blocks(objective)            the decoder layers (_no_split_modules)     its transformer blocks
    fsdp_overrides(cfg)                prompt-prefix sharing off                  nothing
    param_groups(objective, cfg)       one group of trainable parameters          its own (e.g. decay on matrices)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from app.config import Config
from app.lm import modeling
from app.lm.fsdp import default_blocks


class ModelKind:
    """What the engine asks of the model side of a run."""

    def load(self, cfg: Config, device: torch.device, weights_dir: Path | None = None):
        """(model, tokenizer) ready to train; `weights_dir` holds a checkpoint to resume from."""
        raise NotImplementedError

    def save(self, model, tokenizer, directory: Path) -> None:
        """Model weights (safetensors only) and tokenizer into a checkpoint directory."""
        raise NotImplementedError

    def shard_blocks(self, objective: nn.Module) -> list[nn.Module]:
        """The transformer blocks FSDP2 shards one unit each (parallelism='fsdp'); the rest of the objective is the
        root unit."""
        raise NotImplementedError

    def fsdp_overrides(self, cfg: Config) -> dict:
        """Config changes a sharded run makes (and logs). Default: none."""
        return {}

    def param_groups(self, objective: nn.Module, cfg: Config) -> list[dict]:
        """Optimizer parameter groups; each dict may set its own lr / weight_decay. Default: one group of the
        trainable parameters."""
        return [{"params": [p for p in objective.parameters() if p.requires_grad]}]


@dataclass(frozen=True)
class CausalLM(ModelKind):
    """A Hugging Face causal LM (`model_name`), fine-tuned in full or through LoRA adapters (app.lm.modeling).

    added_tokens   special tokens added to the tokenizer (their embedding rows train)
    head_rows      the LM head rows of the added tokens train too (add_adapters' head_rows)
    prefix_shares  boolean settings that compute a prompt prefix once per micro batch: a sharded run turns them off,
                   as FSDP2 gathers a block's weights for the backward when a gradient reaches the block's output, and
                   a gradient that flows through a key/value cache cannot be sharded"""

    added_tokens: tuple[str, ...] = ()
    head_rows: bool = False
    prefix_shares: tuple[str, ...] = ("share_prompt_prefix",)

    def load(self, cfg: Config, device: torch.device, weights_dir: Path | None = None):
        return modeling.load_trainable(cfg, device, list(self.added_tokens), weights_dir, head_rows=self.head_rows)

    def save(self, model, tokenizer, directory: Path) -> None:
        modeling.save_weights(model, tokenizer, directory)

    def shard_blocks(self, objective: nn.Module) -> list[nn.Module]:
        return default_blocks(objective)

    def fsdp_overrides(self, cfg: Config) -> dict:
        return {name: False for name in self.prefix_shares if getattr(cfg, name)}
