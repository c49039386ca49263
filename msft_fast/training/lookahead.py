"""DynamixSFT's look-ahead: a virtual optimizer step that is undone, to see how each document's loss
would move. It is the run's own step (trainer.forward_backward, clipping, AdamW at the current lr,
gradient sync) between a capture and a restore of the whole trainer state in the snapshot pool.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from msft_fast.runtime.distributed import all_reduce_sum
from msft_fast.training.step_stats import doc_means, read_to_host

if TYPE_CHECKING:  # the trainer calls this module: no import at run time
    from msft_fast.training.trainer import Trainer


def lookahead(trainer: "Trainer", plans: list) -> tuple[np.ndarray, np.ndarray]:
    """A virtual optimizer step on `plans` (all ranks' micro-batches of one step), undone: each
    document's mean token loss [D] (in loader.documents_of(plans) order) before the step, from the
    forward of its backward, and after it, from one more forward; then every rank goes back to the
    state before (weights, optimizer, schedule, RNG; bitwise, through the snapshot pool, which must
    keep optimizer state). Its FLOPs (fwd + bwd + fwd) and time count as training, never as kept."""
    pool, loader = trainer.pool, trainer.loader
    if pool is None or not pool.with_optimizer:
        raise RuntimeError("a look-ahead needs a snapshot pool that keeps the optimizer state")
    c, device, T = trainer.counters, trainer.ctx.device, len(trainer.tasks)
    t0 = time.perf_counter()
    base = trainer.capture()
    batches = [b.to(device) for b in loader.batches_of(plans)]
    slots = loader.document_slots(plans)
    n_docs = sum(len(p.docs) for p in plans)
    # Per-task and per-document sums before (row 0) and after (row 1) the step: one reduction.
    both = torch.zeros(2, 3 * T + 2 * n_docs, dtype=torch.float64, device=device)
    before, after = both[0], both[1]
    trainer.forward_backward(batches, trainer.ctx.world_size / max(1, loader.loss_tokens_of(plans)),
                             before[:3 * T].view(3, T), before[3 * T:].view(2, n_docs), slots)
    grad_norm = trainer.clip_gradients()
    pool.wait()  # the capture must have read the weights before they change
    if math.isfinite(grad_norm.item()):
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.forward_sums(batches, after[:3 * T].view(3, T), after[3 * T:].view(2, n_docs), slots)
    all_reduce_sum(both)
    host = read_to_host(before[3 * T:], after[3 * T:])
    trainer.restore(base)
    pool.release(base)
    tokens = sum(p.num_tokens for p in plans)
    lengths = loader.doc_lengths(plans)
    flops = trainer.flop_counter.train(tokens, lengths) + trainer.flop_counter.eval(tokens, lengths)
    c.train_flops += flops
    c.lookahead_flops += flops
    c.lookahead_tokens += tokens
    c.train_seconds += time.perf_counter() - t0
    return doc_means(host[:2 * n_docs]), doc_means(host[2 * n_docs:])
