"""Best-fit packing of documents from all active tasks into micro-batches, and their collation.

A micro-batch is one row of at most `tokens_per_batch` tokens holding whole documents. The order
of an epoch is a pure function of (seed, epoch, active tasks, documents left out), so any rank can
recompute it and a run can resume mid-epoch from a step index alone. A method that draws each
step's documents from task proportions instead (DynamixSFT) packs them with `sample_step`, a pure
function of its random generator and the proportions.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from msft_fast.data.formats import IGNORE_INDEX
from msft_fast.data.tasks import DocSet

# Documents are packed in windows of this many: wide enough for near-zero padding, narrow enough
# that documents of an epoch still mix randomly rather than being sorted by length.
PACK_WINDOW = 4096


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

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

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
            move(self.cu_seqlens), self.max_seqlen, self.doc_lengths, self.num_loss_tokens,
        )


def best_fit_pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item (longest first) goes into the fullest bin it still fits in.

    Returns bins as lists of indices into `lengths`, in the order they were opened. Ties keep the
    input order, so a shuffled input gives a shuffled (but deterministic) packing.
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


def plan_epoch(
    docsets: Sequence[DocSet], active: Sequence[int], capacity: int, seed: int, epoch: int,
    dropped: Optional[dict[int, np.ndarray]] = None,
) -> list[MicroBatchPlan]:
    """The micro-batches of one epoch over the active tasks (indices into `docsets`).

    dropped: per task index, a boolean mask [len(docsets[t])] of documents left out (IES's mastered
    documents); tasks not in it keep every document.
    """
    dropped = dropped or {}
    kept = [np.flatnonzero(~dropped[t]) if t in dropped else np.arange(len(docsets[t]), dtype=np.int64)
            for t in active]
    task_of = np.concatenate([np.full(len(k), t, dtype=np.int64) for t, k in zip(active, kept)] or [np.zeros(0, np.int64)])
    doc_of = np.concatenate([k.astype(np.int64) for k in kept] or [np.zeros(0, np.int64)])
    lengths = np.concatenate([docsets[t].lengths[k] for t, k in zip(active, kept)] or [np.zeros(0, np.int64)])
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    plans = []
    for w in range(0, len(perm), PACK_WINDOW):
        window = perm[w : w + PACK_WINDOW]
        for b in best_fit_pack(lengths[window], capacity):
            sel = window[b]
            plans.append(MicroBatchPlan(task_of[sel], doc_of[sel], int(lengths[sel].sum())))
    # Bins come out longest-document first; shuffle so the step order carries no length trend.
    return [plans[i] for i in rng.permutation(len(plans))]


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
