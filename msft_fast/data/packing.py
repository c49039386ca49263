"""Packing of documents from all active tasks into micro-batches that each train the mixture, and
their collation.

A micro-batch is one row of at most `tokens_per_batch` tokens holding whole documents. An epoch is
planned in two moves. `interleave` orders its documents so that every stretch of the order holds
each task's trained tokens in the epoch's proportions (each task's documents shuffled, then spread
evenly through the epoch, like systematic sampling). `pack_in_order` then fills micro-batches in that
order, topping each one up from the next few documents, so a micro-batch (and an optimizer step of
several) holds the mixture, not one task: sorting documents by length, as best-fit-decreasing does,
sorts them by task when tasks differ in length. The order of an epoch is a pure function of (seed,
epoch, active tasks, documents left out), so any rank can recompute it and a run can resume
mid-epoch from a step index alone. A method that draws each step's documents from task proportions
instead (DynamixSFT) packs them with `sample_step`, a pure function of its random generator and the
proportions.
"""
from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from msft_fast.data.formats import IGNORE_INDEX
from msft_fast.data.tasks import DocSet

# How far ahead of the order `pack_in_order` looks for documents that fill a micro-batch's last gap:
# far enough for little padding (1.7% on the demo mixture against 1.5% for best-fit-decreasing over
# the whole epoch), near enough that a micro-batch stays a slice of the interleaved order.
PACK_LOOKAHEAD = 64

# Static shapes (`data.static_shapes`): rows are padded to a multiple of this many tokens, and the
# padding is split into filler documents of at most this length, so it attends only within itself,
# costs little attention and never needs a position beyond the shortest model's limit.
STATIC_MULTIPLE = 128


@dataclass
class MicroBatchPlan:
    """Which documents go into one micro-batch: parallel arrays of (task index, document index)."""

    tasks: np.ndarray  # [D] int64, index into the task list
    docs: np.ndarray  # [D] int64, index into that task's DocSet
    num_tokens: int


@dataclass
class PackedBatch:
    """One packed micro-batch, ready for the model. N tokens, D documents.

    labels are already shifted (labels[i] is the target of position i) and are IGNORE_INDEX at the
    last position of every document, so no document predicts into the next one.
    """

    input_ids: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N] int64
    position_ids: torch.Tensor  # [N] int64, restarting at 0 in every document
    task_ids: torch.Tensor  # [N] int64
    cu_seqlens: torch.Tensor  # [D+1] int32, document boundaries (flash-attn varlen layout)
    max_seqlen: int
    doc_lengths: list[int]  # [D], for attention FLOPs
    num_loss_tokens: int  # tokens with a label
    filler_docs: int = 0  # the last filler_docs of the D documents are `pad_to`'s filler

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def real_docs(self) -> int:
        """Documents of the plan: the first D - filler_docs."""
        return len(self.doc_lengths) - self.filler_docs

    def document_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(doc [N] int64: each token's document, 0..D-1; task [D] int64: each document's task id),
        on the batch's device, without a host sync."""
        starts, ends = self.cu_seqlens[:-1].long(), self.cu_seqlens[1:].long()
        docs = torch.arange(len(self.doc_lengths), device=starts.device)
        return torch.repeat_interleave(docs, ends - starts, output_size=self.num_tokens), self.task_ids[starts]

    def to(self, device: torch.device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(
            move(self.input_ids), move(self.labels), move(self.position_ids), move(self.task_ids),
            move(self.cu_seqlens), self.max_seqlen, self.doc_lengths, self.num_loss_tokens, self.filler_docs,
        )


def best_fit_pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item (longest first) goes into the fullest bin it still fits in.

    Returns bins as lists of indices into `lengths`, in the order they were opened; ties keep the
    input order. For validation passes, whose order does not matter: it sorts documents by length,
    and with them by task where tasks differ in length, so training plans use `pack_in_order`.
    """
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin id)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"a document of {n} tokens does not fit in a micro-batch of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([int(i)])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(int(i))
            if space - n > 0:
                bisect.insort(free, (space - n, b))
    return bins


def interleave(task_of: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An order of documents (a permutation of their indices) in which each task's weight is spread
    evenly: every task's documents are shuffled, and document j of a task is placed where the middle
    of its weight falls within its task's total (plus one random phase per task), so any stretch of
    the order holds each task's share of the weight up to about one document.

    task_of [D]: each document's task; weights [D] (> 0): what the shares count (trained tokens).
    """
    keys = np.empty(len(task_of), dtype=np.float64)
    for t in np.unique(task_of):
        idx = np.flatnonzero(task_of == t)
        idx = idx[rng.permutation(len(idx))]
        w = weights[idx].astype(np.float64)
        total = w.sum()
        keys[idx] = (np.cumsum(w) - w / 2 + rng.random() * total / len(idx)) / total
    return np.lexsort((rng.random(len(keys)), keys))  # ties (equal keys of two tasks) in random order


def pack_in_order(order: np.ndarray, lengths: np.ndarray, capacity: int,
                  lookahead: int = PACK_LOOKAHEAD) -> list[list[int]]:
    """Micro-batches (lists of indices into `lengths`) filled with documents in `order`: when the next
    document does not fit, the gap is filled from the next `lookahead` documents (the longest that
    fits, repeatedly), then the next micro-batch starts. Each micro-batch is thus a slice of the
    order, give or take the few documents pulled forward to fill it.
    """
    queue = collections.deque(int(i) for i in order)
    bins: list[list[int]] = []
    current, used = [], 0
    while queue:
        n = int(lengths[queue[0]])
        if n > capacity:
            raise ValueError(f"a document of {n} tokens does not fit in a micro-batch of {capacity}")
        if used + n <= capacity:
            current.append(queue.popleft())
            used += n
            continue
        while used < capacity:
            gap, best, best_n = capacity - used, -1, 0
            for k in range(1, min(lookahead, len(queue))):
                m = int(lengths[queue[k]])
                if best_n < m <= gap:
                    best, best_n = k, m
                    if m == gap:
                        break
            if best < 0:
                break
            current.append(queue[best])
            del queue[best]
            used += best_n
        bins.append(current)
        current, used = [], 0
    if current:
        bins.append(current)
    return bins


def plan_epoch(
    docsets: Sequence[DocSet], active: Sequence[int], capacity: int, seed: int, epoch: int,
    dropped: Optional[dict[int, np.ndarray]] = None,
) -> list[MicroBatchPlan]:
    """The micro-batches of one epoch over the active tasks (indices into `docsets`), in training
    order: interleaved by trained tokens (`interleave`), then packed in that order (`pack_in_order`).

    dropped: per task index, a boolean mask [len(docsets[t])] of documents left out (IES's mastered
    documents); tasks not in it keep every document.
    """
    dropped = dropped or {}
    kept = [np.flatnonzero(~dropped[t]) if t in dropped else np.arange(len(docsets[t]), dtype=np.int64)
            for t in active]
    empty = np.zeros(0, np.int64)
    task_of = np.concatenate([np.full(len(k), t, dtype=np.int64) for t, k in zip(active, kept)] or [empty])
    doc_of = np.concatenate([k.astype(np.int64) for k in kept] or [empty])
    lengths = np.concatenate([docsets[t].lengths[k] for t, k in zip(active, kept)] or [empty])
    weights = np.concatenate([docsets[t].loss_tokens[k] for t, k in zip(active, kept)] or [empty])
    rng = np.random.default_rng([seed, epoch])
    order = interleave(task_of, np.maximum(weights, 1), rng)
    plans = []
    for b in pack_in_order(order, lengths, capacity):
        sel = np.asarray(b, dtype=np.int64)
        plans.append(MicroBatchPlan(task_of[sel], doc_of[sel], int(lengths[sel].sum())))
    return plans


def step_task_tokens(plans: Sequence[MicroBatchPlan], docsets: Sequence[DocSet], per_step: int) -> np.ndarray:
    """[steps, T] trained tokens of each task in each optimizer step (`per_step` micro-batches each;
    the last step of an epoch may hold fewer)."""
    steps = np.zeros((-(-len(plans) // per_step), len(docsets)), dtype=np.int64)
    for i, p in enumerate(plans):
        for t in np.unique(p.tasks):
            steps[i // per_step, t] += int(docsets[t].loss_tokens[p.docs[p.tasks == t]].sum())
    return steps


def mixing_tv(plans: Sequence[MicroBatchPlan], docsets: Sequence[DocSet], per_step: int) -> float:
    """The mean, over the epoch's optimizer steps, of the total-variation distance between a step's
    task shares of trained tokens and the whole epoch's: 0 when every step holds the mixture in its
    proportions, 1 when steps hold disjoint tasks."""
    steps = step_task_tokens(plans, docsets, per_step).astype(np.float64)
    steps = steps[steps.sum(axis=1) > 0]
    if not len(steps):
        return 0.0
    epoch = steps.sum(axis=0) / steps.sum()
    shares = steps / steps.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(shares - epoch).sum(axis=1).mean())


def sample_step(docsets: Sequence[DocSet], proportions: np.ndarray, capacity: int, bins: int,
                rng: np.random.Generator, max_misses: int = 8) -> list[MicroBatchPlan]:
    """`bins` micro-batches of documents drawn one at a time: the task from `proportions` [T] (over
    documents; they sum to 1), the document uniformly within it, with replacement (DynamixSFT's
    sampling). Each document goes into the fullest micro-batch it still fits in; drawing stops after
    `max_misses` draws in a row that fit nowhere (a document always fits an empty micro-batch, so
    none stays empty). A pure function of the generator's state and the inputs.
    """
    proportions = np.asarray(proportions, dtype=np.float64)
    cdf = np.cumsum(proportions)
    last = int(np.flatnonzero(proportions)[-1])  # takes any rounding slack at the top of the sum
    members: list[list[tuple[int, int]]] = [[] for _ in range(bins)]
    used = [0] * bins
    misses = 0
    while misses < max_misses:
        t = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), last)
        d = int(rng.integers(len(docsets[t])))
        n = int(docsets[t].lengths[d])
        fits = [b for b in range(bins) if used[b] + n <= capacity]
        if not fits:
            misses += 1
            continue
        misses = 0
        b = max(fits, key=lambda i: (used[i], -i))  # the fullest; ties: the first
        members[b].append((t, d))
        used[b] += n
    return [MicroBatchPlan(np.array([t for t, _ in m], dtype=np.int64), np.array([d for _, d in m], dtype=np.int64), u)
            for m, u in zip(members, used)]


def padding_fraction(plans: Sequence[MicroBatchPlan], capacity: int) -> float:
    """Share of micro-batch capacity left empty (what padding to a fixed shape would waste)."""
    if not plans:
        return 0.0
    return 1.0 - sum(p.num_tokens for p in plans) / (capacity * len(plans))


def collate(plan: MicroBatchPlan, docsets: Sequence[DocSet], task_ids: Sequence[int]) -> PackedBatch:
    """Concatenate the planned documents into one packed row. `task_ids[t]` is task t's global id."""
    ids, labels, positions, tasks, lengths = [], [], [], [], []
    for t, d in zip(plan.tasks.tolist(), plan.docs.tolist()):
        ds = docsets[t]
        s, n = int(ds.starts[d]), int(ds.lengths[d])
        ids.append(ds.input_ids[s : s + n])
        labels.append(ds.labels[s : s + n])
        positions.append(np.arange(n, dtype=np.int64))
        tasks.append(np.full(n, task_ids[t], dtype=np.int64))
        lengths.append(n)
    return _to_batch(ids, labels, positions, tasks, lengths)


def empty_batch() -> PackedBatch:
    """A one-token micro-batch with no label: keeps every rank stepping in lockstep at an epoch's
    end (FSDP needs each rank to run the same number of forwards) without changing the loss."""
    return _to_batch([np.zeros(1, np.int32)], [np.full(1, IGNORE_INDEX, np.int32)], [np.zeros(1, np.int64)],
                     [np.zeros(1, np.int64)], [1])


def static_length(tokens_per_batch: int) -> int:
    """The token count of every micro-batch under static shapes: data.tokens_per_batch rounded up
    to a multiple of STATIC_MULTIPLE (what compiled kernels tile by)."""
    return -(-tokens_per_batch // STATIC_MULTIPLE) * STATIC_MULTIPLE


def pad_to(batch: PackedBatch, length: int) -> PackedBatch:
    """`batch` padded to exactly `length` tokens with filler documents, so that whatever is compiled
    (FlexAttention, train.compile's blocks) sees one shape for the whole run. The filler has no
    labels, comes after the real documents, and is split into documents of at most STATIC_MULTIPLE
    tokens (positions restarting in each): it attends only to itself and changes no loss, no
    statistic and no real token's output."""
    n = batch.num_tokens
    if n > length:
        raise ValueError(f"a micro-batch of {n} tokens does not fit the static length {length}")
    if n == length:
        return batch
    k = length - n
    pieces = [STATIC_MULTIPLE] * (k // STATIC_MULTIPLE) + ([k % STATIC_MULTIPLE] if k % STATIC_MULTIPLE else [])
    filler_task = batch.task_ids[-1:].expand(k)  # any real task's id: its labels are ignored
    cu = torch.from_numpy(np.cumsum(pieces, dtype=np.int32)) + batch.cu_seqlens[-1]
    return PackedBatch(
        input_ids=torch.cat([batch.input_ids, batch.input_ids.new_zeros(k)]),
        labels=torch.cat([batch.labels, batch.labels.new_full((k,), IGNORE_INDEX)]),
        position_ids=torch.cat([batch.position_ids, torch.cat([torch.arange(p) for p in pieces])]),
        task_ids=torch.cat([batch.task_ids, filler_task]),
        cu_seqlens=torch.cat([batch.cu_seqlens, cu.to(batch.cu_seqlens.dtype)]),
        max_seqlen=max(batch.max_seqlen, max(pieces)),
        doc_lengths=batch.doc_lengths + pieces,
        num_loss_tokens=batch.num_loss_tokens,
        filler_docs=batch.filler_docs + len(pieces),
    )


def _to_batch(ids, labels, positions, tasks, lengths) -> PackedBatch:
    labels_t = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        labels=labels_t,
        position_ids=torch.from_numpy(np.concatenate(positions)),
        task_ids=torch.from_numpy(np.concatenate(tasks)),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=max(lengths),
        doc_lengths=list(lengths),
        num_loss_tokens=int((labels_t != IGNORE_INDEX).sum()),
    )
