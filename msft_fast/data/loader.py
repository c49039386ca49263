"""Deals the packed micro-batches of the active mixture out to optimizer steps and ranks.

Step s of an epoch uses global micro-batches [s*W*A, (s+1)*W*A) of that epoch's plan (W ranks,
A accumulation steps), dealt to ranks in equal numbers with balanced token counts. So 1 rank with
grad_accum=2k and 2 ranks with grad_accum=k train on the same micro-batches in every step. At an epoch's end the last step
may hold fewer micro-batches; ranks that run short get empty ones so all ranks step in lockstep.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from msft_fast.data.packing import MicroBatchPlan, PackedBatch, best_fit_pack, collate, empty_batch, plan_epoch
from msft_fast.data.tasks import TaskData


class MixtureLoader:
    def __init__(self, tasks: Sequence[TaskData], tokens_per_batch: int, seed: int, rank: int, world_size: int,
                 grad_accum: int):
        self.tasks = list(tasks)
        self.capacity = tokens_per_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_step = world_size * grad_accum  # micro-batches in one optimizer step, all ranks
        self.active: tuple[int, ...] = tuple(range(len(self.tasks)))
        self._plans: dict[tuple, list[MicroBatchPlan]] = {}

    def set_active(self, active: Sequence[int]) -> None:
        self.active = tuple(sorted(active))

    def epoch_plan(self, epoch: int) -> list[MicroBatchPlan]:
        key = (self.active, epoch)
        if key not in self._plans:
            docsets = [t.train for t in self.tasks]
            self._plans[key] = plan_epoch(docsets, self.active, self.capacity, self.seed, epoch)
        return self._plans[key]

    def steps_in_epoch(self, epoch: int) -> int:
        return math.ceil(len(self.epoch_plan(epoch)) / self.per_step)

    def last_step_of(self, epoch: int, target_epochs: float) -> int:
        """How many steps of `epoch` lie before the position `target_epochs` (fractional epochs)."""
        steps = self.steps_in_epoch(epoch)
        # Half steps round up (Python's round() would alternate between up and down).
        return min(steps, max(0, math.floor((target_epochs - epoch) * steps + 0.5)))

    def steps_between(self, epoch: int, step: int, target_epochs: float) -> int:
        """Optimizer steps from step `step` of `epoch` to the position `target_epochs`."""
        total = 0
        while True:
            end = self.last_step_of(epoch, target_epochs)
            total += max(0, end - step)
            if end < self.steps_in_epoch(epoch) or target_epochs <= epoch + 1:
                return total
            epoch, step = epoch + 1, 0

    def step_plans(self, epoch: int, step: int) -> list[MicroBatchPlan]:
        """All micro-batches of optimizer step `step` of `epoch`, over all ranks."""
        return self.epoch_plan(epoch)[step * self.per_step : (step + 1) * self.per_step]

    def step_batches(self, epoch: int, step: int) -> list[PackedBatch]:
        """This rank's micro-batches of optimizer step `step` of `epoch`."""
        return self._deal(self.step_plans(epoch, step), [t.train for t in self.tasks])

    def step_loss_tokens(self, epoch: int, step: int) -> int:
        """Trained tokens of the whole step over all ranks. Every rank knows the global plan, so this
        equals an all-reduce of the per-rank counts without the collective."""
        return sum(int(self.tasks[t].train.loss_tokens[d])
                   for p in self.step_plans(epoch, step) for t, d in zip(p.tasks, p.docs))

    def doc_lengths(self, plans: Sequence[MicroBatchPlan]) -> list[int]:
        return [int(self.tasks[t].train.lengths[d]) for p in plans for t, d in zip(p.tasks, p.docs)]

    def eval_batches(self) -> list[PackedBatch]:
        """This rank's share of all tasks' validation documents (every task, active or not)."""
        docsets = [t.val for t in self.tasks]
        task_of = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(docsets)])
        doc_of = np.concatenate([np.arange(len(d), dtype=np.int64) for d in docsets])
        lengths = np.concatenate([d.lengths for d in docsets])
        plans = [MicroBatchPlan(task_of[b], doc_of[b], int(lengths[b].sum()))
                 for b in best_fit_pack(lengths, self.capacity)]
        return self._deal(plans, docsets)

    def _deal(self, plans: list[MicroBatchPlan], docsets) -> list[PackedBatch]:
        """This rank's share of `plans`: equal counts (short ranks get empty micro-batches), tokens
        balanced by dealing the largest first in a snake order (0..W-1, W-1..0, ...), so no rank's
        total exceeds another's by more than one micro-batch."""
        slots = math.ceil(len(plans) / self.world_size)
        mine = rank_share(plans, self.rank, self.world_size)
        task_ids = [t.task_id for t in self.tasks]
        return [collate(p, docsets, task_ids) for p in mine] + [empty_batch() for _ in range(slots - len(mine))]


def rank_share(plans: Sequence[MicroBatchPlan], rank: int, world_size: int) -> list[MicroBatchPlan]:
    """Rank `rank`'s micro-batches: the largest first, dealt in rounds of W, every other round in
    reverse (0..W-1, W-1..0, ...)."""
    order = sorted(range(len(plans)), key=lambda i: (-plans[i].num_tokens, i))
    share = []
    for k, i in enumerate(order):
        pos = k % world_size
        if (pos if (k // world_size) % 2 == 0 else world_size - 1 - pos) == rank:
            share.append(plans[i])
    return share

