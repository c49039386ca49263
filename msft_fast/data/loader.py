"""Deals the packed micro-batches of the active mixture out to optimizer steps and ranks.

Step s of an epoch uses global micro-batches [s*W*A, (s+1)*W*A) of that epoch's plan (W ranks,
A accumulation steps), dealt to ranks in equal numbers with balanced token counts. So 1 rank with
grad_accum=2k and 2 ranks with grad_accum=k train on the same micro-batches in every step. At an epoch's end the last step
may hold fewer micro-batches; ranks that run short get empty ones so all ranks step in lockstep.

Two methods change what an epoch holds: IES leaves mastered documents out of the epochs after they
are mastered (`drop_documents`), and DynamixSFT draws each step's documents from task proportions
(`ProportionalSampler`, installed with `set_sampler`); an epoch then keeps its length in steps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from msft_fast.data.packing import (
    MicroBatchPlan, PackedBatch, best_fit_pack, collate, empty_batch, mixing_tv, pad_to, padding_fraction,
    plan_epoch, sample_step,
)
from msft_fast.data.tasks import TaskData

# Independent random streams of one seed: epoch shuffles use [seed, epoch]; these add a tag first.
SAMPLED_STEP_STREAM = 1_000_003
LOOKAHEAD_STREAM = 1_000_033


class MixtureLoader:
    """static_tokens: when set (`data.static_shapes`, packing.static_length), every micro-batch this
    rank gets, training and evaluation, is padded to exactly that many tokens (packing.pad_to)."""

    def __init__(self, tasks: Sequence[TaskData], tokens_per_batch: int, seed: int, rank: int, world_size: int,
                 grad_accum: int, static_tokens: Optional[int] = None):
        self.tasks = list(tasks)
        self.capacity = tokens_per_batch
        self.static_tokens = static_tokens
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_step = world_size * grad_accum  # micro-batches in one optimizer step, all ranks
        self.active: tuple[int, ...] = tuple(range(len(self.tasks)))
        self.dropped: dict[int, np.ndarray] = {}  # task index -> bool mask of documents left out
        self._dropped_version = 0
        self.sampler: Optional[ProportionalSampler] = None
        self._plans: dict[tuple, list[MicroBatchPlan]] = {}

    def set_active(self, active: Sequence[int]) -> None:
        self.active = tuple(sorted(active))

    def drop_documents(self, task: int, docs: Sequence[int]) -> None:
        """Leave these documents of task index `task` out of every epoch planned from now on (an
        epoch already planned keeps them: IES drops documents at epoch ends only)."""
        mask = self.dropped.setdefault(task, np.zeros(len(self.tasks[task].train), dtype=bool))
        mask[np.asarray(docs, dtype=np.int64)] = True
        self._dropped_version += 1

    def set_dropped(self, dropped: dict[int, np.ndarray]) -> None:
        """Replace every task's mask of left-out documents (a resumed run's)."""
        self.dropped = {t: np.array(m, dtype=bool) for t, m in dropped.items()}
        self._dropped_version += 1

    def set_sampler(self, sampler: Optional["ProportionalSampler"]) -> None:
        """Draw every step's documents with `sampler` (None: the epoch plans again)."""
        self.sampler = sampler

    def epoch_plan(self, epoch: int) -> list[MicroBatchPlan]:
        key = (self.active, epoch, self._dropped_version)
        if key not in self._plans:
            docsets = [t.train for t in self.tasks]
            self._plans[key] = plan_epoch(docsets, self.active, self.capacity, self.seed, epoch, self.dropped)
        return self._plans[key]

    def packing_stats(self, epoch: int) -> Optional[dict]:
        """How well the plan of `epoch` over the active tasks mixes and fills its micro-batches
        (history.json `packing.epochs`); None while a sampler draws the steps (DynamixSFT's own rule)."""
        if self.sampler is not None:
            return None
        plans = self.epoch_plan(epoch)
        return {"epoch": epoch, "tasks": [self.tasks[i].name for i in self.active],
                "steps": self.steps_in_epoch(epoch), "micro_batches": len(plans),
                "mixing_tv": round(mixing_tv(plans, [t.train for t in self.tasks], self.per_step), 6),
                "padding": round(padding_fraction(plans, self.static_tokens or self.capacity), 6)}

    def steps_in_full_epoch(self) -> int:
        """Optimizer steps of an epoch over every task: the most any epoch of the mixture takes."""
        docsets = [t.train for t in self.tasks]
        plans = plan_epoch(docsets, range(len(self.tasks)), self.capacity, self.seed, 0)
        return math.ceil(len(plans) / self.per_step)

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
        if self.sampler is not None:
            return self.sampler.step_plans(epoch, step)
        return self.epoch_plan(epoch)[step * self.per_step : (step + 1) * self.per_step]

    def step_batches(self, epoch: int, step: int) -> list[PackedBatch]:
        """This rank's micro-batches of optimizer step `step` of `epoch`."""
        return self.batches_of(self.step_plans(epoch, step))

    def batches_of(self, plans: list[MicroBatchPlan]) -> list[PackedBatch]:
        """This rank's share of `plans` (all ranks' micro-batches of one step), collated."""
        return self._deal(plans, [t.train for t in self.tasks])

    def step_loss_tokens(self, epoch: int, step: int) -> int:
        """Trained tokens of the whole step over all ranks. Every rank knows the global plan, so this
        equals an all-reduce of the per-rank counts without the collective."""
        return self.loss_tokens_of(self.step_plans(epoch, step))

    def loss_tokens_of(self, plans: Sequence[MicroBatchPlan]) -> int:
        return sum(int(self.tasks[t].train.loss_tokens[d]) for p in plans for t, d in zip(p.tasks, p.docs))

    def documents_of(self, plans: Sequence[MicroBatchPlan]) -> tuple[np.ndarray, np.ndarray]:
        """(task index [D], document index [D]) of every document in `plans`, in plan order: the
        order of the per-document slots that `document_slots` gives each rank."""
        if not plans:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([p.tasks for p in plans]), np.concatenate([p.docs for p in plans])

    def document_slots(self, plans: Sequence[MicroBatchPlan]) -> list[Optional[np.ndarray]]:
        """For each of this rank's micro-batches of `plans` (as `batches_of` gives them), the positions
        [D_b] of its documents in `documents_of(plans)`; None for an empty filler micro-batch."""
        offsets = np.cumsum([0] + [len(p.docs) for p in plans])
        mine = [np.arange(offsets[i], offsets[i + 1]) for i in rank_share_indices(plans, self.rank, self.world_size)]
        slots = math.ceil(len(plans) / self.world_size)
        return mine + [None] * (slots - len(mine))

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
        batches = [collate(p, docsets, task_ids) for p in mine] + [empty_batch() for _ in range(slots - len(mine))]
        if self.static_tokens is not None:
            batches = [pad_to(b, self.static_tokens) for b in batches]
        return batches


def rank_share(plans: Sequence[MicroBatchPlan], rank: int, world_size: int) -> list[MicroBatchPlan]:
    """Rank `rank`'s micro-batches: the largest first, dealt in rounds of W, every other round in
    reverse (0..W-1, W-1..0, ...)."""
    return [plans[i] for i in rank_share_indices(plans, rank, world_size)]


def rank_share_indices(plans: Sequence[MicroBatchPlan], rank: int, world_size: int) -> list[int]:
    """Indices into `plans` of rank `rank`'s micro-batches, in the order `rank_share` gives them."""
    order = sorted(range(len(plans)), key=lambda i: (-plans[i].num_tokens, i))
    share = []
    for k, i in enumerate(order):
        pos = k % world_size
        if (pos if (k // world_size) % 2 == 0 else world_size - 1 - pos) == rank:
            share.append(i)
    return share


class ProportionalSampler:
    """DynamixSFT's data: every optimizer step's documents drawn from task proportions [T] (over
    documents), each task's document uniformly with replacement (packing.sample_step), into the
    step's world_size x grad_accum micro-batches. Step (epoch, step) is a pure function of the seed
    and the proportions in force, so a run resumes from the proportions alone."""

    def __init__(self, loader: MixtureLoader, proportions: np.ndarray):
        self.loader = loader
        self.proportions = np.asarray(proportions, dtype=np.float64)
        self._last: Optional[tuple[tuple, list[MicroBatchPlan]]] = None

    def set_proportions(self, proportions: np.ndarray) -> None:
        self.proportions = np.asarray(proportions, dtype=np.float64)

    def step_plans(self, epoch: int, step: int) -> list[MicroBatchPlan]:
        key = (epoch, step, self.proportions.tobytes())
        if self._last is None or self._last[0] != key:  # a step asks for its plans several times
            rng = np.random.default_rng([self.loader.seed, SAMPLED_STEP_STREAM, epoch, step])
            self._last = key, self._draw(self.proportions, rng)
        return self._last[1]

    def lookahead_plans(self, task: int, update: int) -> list[MicroBatchPlan]:
        """One step's worth of micro-batches of task index `task` alone, for look-ahead number `update`."""
        onehot = np.zeros(len(self.loader.tasks))
        onehot[task] = 1.0
        return self._draw(onehot, np.random.default_rng([self.loader.seed, LOOKAHEAD_STREAM, update, task]))

    def _draw(self, proportions: np.ndarray, rng: np.random.Generator) -> list[MicroBatchPlan]:
        docsets = [t.train for t in self.loader.tasks]
        return sample_step(docsets, proportions, self.loader.capacity, self.loader.per_step, rng)

