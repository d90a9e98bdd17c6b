"""`parallelism='fsdp'`: PyTorch FSDP2 (`fully_shard`) over the training processes.

Parameters, gradients and optimizer state are split over the processes instead of copied to each: every transformer
block the model kind names (`ModelKind.shard_blocks`, app/lm/kind.py) is one unit, gathered just before its forward
and backward and freed after; the loss module (the objective) is the root unit and holds the rest (embeddings, final
norm, LM head, a task's head), kept gathered for the whole step (FSDP2 does not reshard the root after forward).
Frozen parameters (a LoRA base) are sharded too; only trainable ones get gradients and optimizer state.

Checkpoints do not change format with sharding: at save time the full weights are gathered to rank 0's CPU memory
(one tensor at a time, the GPUs hold no more than their shards) and rank 0 writes them with the task's own save code:
one consolidated safetensors file, as a single-process run writes it. The optimizer state is gathered to rank 0 and
saved in full, keyed by parameter name: a checkpoint resumes on any number of processes, with or without sharding.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 shards this module (or one inside it) across processes."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return bool(fsdp_modules(module))


def default_blocks(objective: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the Hugging Face model inside a loss module (through a peft wrapper): the modules
    whose class the model lists in `_no_split_modules` (e.g. MistralDecoderLayer), the unit sharding engines split
    on."""
    from transformers import PreTrainedModel

    names = {n for m in objective.modules() if isinstance(m, PreTrainedModel) for n in m._no_split_modules or ()}
    return [m for m in objective.modules() if type(m).__name__ in names]


def shard(objective: nn.Module, blocks: list[nn.Module], cpu_offload: bool) -> None:
    """fully_shard each block, then the objective as the root, in place (parameters become DTensors: build the
    optimizer after this)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if not blocks:
        from app.errors import UserError

        raise UserError(f"parallelism='fsdp': {type(objective).__name__} names no transformer blocks to shard "
                        "(the model kind's shard_blocks)")
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, offload_policy=offload)
    fully_shard(objective, offload_policy=offload)
    log.info("FSDP2: %d blocks + the root sharded over %d processes%s", len(blocks),
             torch.distributed.get_world_size(), ", parameters offloaded to CPU" if cpu_offload else "")


def gradient_sync(objective: nn.Module, sync: bool) -> None:
    """Skip the reduce-scatter on the micro batches before the last of an optimizer step (the gradients accumulate
    unsharded, as DDP's no_sync)."""
    objective.set_requires_gradient_sync(sync)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


@contextlib.contextmanager
def gathered(objective: nn.Module):
    """The full weights in the modules of rank 0 for the duration (every process must enter; the others hold their
    shards): what the tasks' own save code reads. They are gathered to CPU one tensor at a time and put in place of
    the shards, which go back afterwards; the modules must not run forward meanwhile."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(objective, options=_options())
    swapped = []
    if full:
        by_name = dict(objective.named_parameters(remove_duplicate=False))
        replacement = {id(by_name[n]): nn.Parameter(t, requires_grad=by_name[n].requires_grad)
                       for n, t in full.items() if n in by_name}
        for module in objective.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) in replacement:
                    swapped.append((module, name, param))
        for module, name, param in swapped:
            module._parameters[name] = replacement[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextlib.contextmanager
def root_gathered(objective: nn.Module):
    """The root unit's parameters (embeddings, norm, heads) gathered for the duration, the blocks still gathered one
    at a time by their own hooks: how evaluation calls the model directly (generation) without the full weights."""
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


# --- optimizer state, gathered and keyed by parameter name ---------------------------------------------------
def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_optimizer_state(objective: nn.Module, optimizer) -> dict:
    """The whole optimizer state on rank 0 (CPU), keyed by parameter name; every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(objective, optimizer, options=_options())


def load_full_optimizer_state(objective: nn.Module, optimizer, state: dict) -> None:
    """Shard a full, name-keyed optimizer state (read on rank 0; the others pass {}) onto every process."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(objective, optimizer, state, options=_options(broadcast_from_rank0=True))
