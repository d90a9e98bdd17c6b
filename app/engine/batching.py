"""The data plan: which examples every process uses at every optimizer step.

The plan is a pure function of (seed, epoch, lengths, batch geometry), so a resumed run only needs the step
number to continue with exactly the batches it would have seen, and every process can count the loss
items of the whole global batch without talking to the others.

Length grouping: each epoch's shuffled order is cut into windows of `GROUP_WINDOW` global batches, each
window sorted by length and cut into micro-batches, and the global batches are shuffled again so long
and short batches alternate over the epoch (the same idea as the usual length-grouped sampler).

Windows (`window` > 0): every time an example is drawn, the step trains on `window` of its tokens from an offset drawn
uniformly over the example, seeded by (seed, epoch, step) (language-model training on random crops of a long text).
The offsets are part of the plan, so a resumed run cuts the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_WINDOW = 16


@dataclass(frozen=True)
class BatchPlan:
    lengths: tuple[int, ...]
    micro_batch_size: int
    world_size: int
    accumulation: int
    seed: int
    group_by_length: bool = True
    window: int = 0  # > 0: examples are cut to windows of this many tokens at seeded random offsets

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch  # the incomplete last global batch is left out

    def epoch_order(self, epoch: int) -> list[list[list[int]]]:
        """[step][micro-batch slot] -> example indices, for one epoch. Slot = accumulation index x world + rank."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.global_batch]
        if self.group_by_length:
            window = self.global_batch * GROUP_WINDOW
            lengths = np.asarray(self.lengths)
            chunks = [order[i : i + window] for i in range(0, len(order), window)]
            order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
        micro = order.reshape(-1, self.micro_batch_size)
        steps = micro.reshape(self.steps_per_epoch, self.world_size * self.accumulation, self.micro_batch_size)
        if self.group_by_length:
            steps = steps[rng.permutation(len(steps))]
        return steps.tolist()

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within epoch) of a global step."""
        return divmod(step, self.steps_per_epoch)

    def window_starts(self, epoch: int, step_in_epoch: int, slots: list[list[int]]) -> list[list[int]]:
        """[micro-batch slot] -> where each example's window starts at this step (0 for one that fits the window)."""
        rng = np.random.default_rng([self.seed, epoch, step_in_epoch, 1])  # a stream apart from epoch_order's
        spans = np.maximum(np.asarray(self.lengths)[np.asarray(slots)] - self.window, 0) + 1
        return rng.integers(0, spans).tolist()

    def rank_slots(self, rank: int) -> list[int]:
        """The micro-batch slots of one process, in accumulation order."""
        return [a * self.world_size + rank for a in range(self.accumulation)]

    def micro_batches(self, epoch_steps: list[list[list[int]]], step_in_epoch: int, rank: int) -> list[list[int]]:
        slots = epoch_steps[step_in_epoch]
        return [slots[s] for s in self.rank_slots(rank)]
