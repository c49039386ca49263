"""Chunked pure-PyTorch reference of the fused linear + cross-entropy loss with per-task stats.

Shapes: N tokens, H hidden size, V vocabulary size, T tasks, C rows per chunk.
Inputs reaching this module are already validated and contiguous (see fused_linear_cross_entropy.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

# Target size of one chunk of logits: bounds the transient memory of a chunk to ~64 MiB.
_CHUNK_BYTES = 64 * 2**20


class TaskStats(NamedTuple):
    """Detached per-task statistics of one loss call (all tensors have shape [T])."""

    loss_sum: torch.Tensor  # float32: sum of per-token losses of the task's non-ignored tokens
    tokens: torch.Tensor  # int64: number of non-ignored tokens of the task
    correct: torch.Tensor  # int64: non-ignored tokens whose argmax over the logits equals the label


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of logits/lse/accumulators: float64 stays float64 (exact tests), all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def auto_chunk_size(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that a chunk's [C, V] logits in the compute dtype take about 64 MiB."""
    itemsize = torch.finfo(compute_dtype(dtype)).bits // 8
    return max(1, _CHUNK_BYTES // (max(vocab, 1) * itemsize))


def _chunk_logits(hidden: torch.Tensor, weight_c: torch.Tensor, rows: slice) -> torch.Tensor:
    """[C, V] logits of the rows in the compute dtype of `weight_c` (the upcast weight)."""
    return hidden[rows].to(weight_c.dtype) @ weight_c.T


def _forward(hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size, grads=None):
    """Chunked forward pass.

    hidden [N, H], weight [V, H], labels [N] int64, task_ids [N] int64.
    Returns per-token loss [N] and logsumexp [N] in the compute dtype, and TaskStats with [T] tensors.
    `grads`: optional (grad_hidden [N, H] or None, grad_weight [V, H] fp32 or None) buffers that
    receive the gradient of the summed loss while each chunk's logits are at hand.
    """
    n, dev, cdt = hidden.shape[0], hidden.device, compute_dtype(hidden.dtype)
    # Low-precision weights are upcast once so the matmul yields fp32 logits (the Triton kernel
    # will instead accumulate bf16/fp16 tiles in fp32 registers and need no copy); no-op for fp32/fp64.
    weight_c = weight.to(cdt)
    loss = torch.empty(n, dtype=cdt, device=dev)
    lse = torch.empty(n, dtype=cdt, device=dev)
    loss_sum = torch.zeros(num_tasks, dtype=cdt, device=dev)
    tokens = torch.zeros(num_tasks, dtype=torch.int64, device=dev)
    correct = torch.zeros(num_tasks, dtype=torch.int64, device=dev)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        logits = _chunk_logits(hidden, weight_c, rows)
        y = labels[rows]
        valid = y != ignore_index
        target = logits.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
        hit = valid & (logits.argmax(dim=-1) == y)
        # One exp pass over the chunk serves the log-sum-exp and, when training, the softmax
        # (torch.logsumexp would make its own pass and the gradient another).
        row_max = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # the logits buffer now holds exp(logits - max)
        total = probs.sum(dim=-1)
        c_lse = row_max.squeeze(1) + total.log()
        c_loss = torch.where(valid, c_lse - target, 0.0)
        # Ignored tokens may carry any task id; route them to task 0, where they add only zeros.
        tid = torch.where(valid, task_ids[rows], 0)
        loss[rows], lse[rows] = c_loss, c_lse
        # index_add_ instead of boolean masking keeps the loop free of host syncs.
        loss_sum.index_add_(0, tid, c_loss)
        tokens.index_add_(0, tid, valid.long())
        correct.index_add_(0, tid, hit.long())
        if grads is not None:
            _accumulate_grads(hidden, weight_c, probs.div_(total[:, None]), y, valid, None, rows, *grads)
    return loss, lse, TaskStats(loss_sum.float(), tokens, correct)


def _accumulate_grads(hidden, weight_c, softmax, y, valid, upstream, rows, grad_hidden, grad_weight):
    """Gradient of the chunk's loss w.r.t. hidden rows and weight: (softmax - onehot(y)) x upstream.

    Overwrites `softmax` [C, V] (the chunk's own buffer). `upstream` [C] or None (= 1 for every token).
    """
    grad_logits = softmax
    grad_logits[torch.arange(y.shape[0], device=y.device), torch.where(valid, y, 0)] -= 1.0
    # Ignored tokens have a constant 0 loss: zero their row (and any inf/NaN upstream grad there).
    scale = valid.to(grad_logits.dtype) if upstream is None else torch.where(valid, upstream, 0.0)
    grad_logits *= scale[:, None]
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight_c
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T, hidden[rows].to(weight_c.dtype))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses [N] plus TaskStats; recomputes chunk logits in backward instead of storing them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size):
        loss, lse, stats = _forward(hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size)
        # Only O(N) extra memory is saved (lse); hidden/weight/labels are the caller's own tensors.
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused_stat_grads):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        cdt = lse.dtype
        weight_c = weight.to(cdt)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated over chunks in the compute dtype, cast to weight's dtype once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            y = labels[rows]
            softmax = _chunk_logits(hidden, weight_c, rows).sub_(lse[rows, None]).exp_()
            _accumulate_grads(hidden, weight_c, softmax, y, y != ctx.ignore_index,
                              grad_loss[rows].to(cdt), rows, grad_hidden, grad_weight)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


class SummedLinearCrossEntropyFunction(torch.autograd.Function):
    """The summed loss (scalar) plus TaskStats, with the gradients computed during the forward.

    A scalar loss has a scalar upstream gradient, so the gradients can be formed while each chunk's
    logits exist and merely scaled in backward: one logits matmul per chunk instead of two.
    Holds grad_hidden [N, H] (input dtype) and grad_weight [V, H] (weight dtype, accumulated in
    fp32) from forward to backward; backward would allocate the same buffers anyway.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size):
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        cdt = compute_dtype(hidden.dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=cdt, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_weight else None
        loss, _, stats = _forward(hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size,
                                  grads=(grad_hidden, grad_weight))
        ctx.grad_hidden = grad_hidden.to(hidden.dtype) if need_hidden else None
        ctx.grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        ctx.mark_non_differentiable(*stats)
        return (loss.sum(), *stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused_stat_grads):
        # Kept on ctx (freed with the graph) so a retained graph can run backward again.
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        scale = grad_loss.to(torch.float32 if grad_loss.dtype != torch.float64 else grad_loss.dtype)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * scale.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy_reference(
    hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction, chunk_size
) -> tuple[torch.Tensor, TaskStats]:
    """Reference backend; arguments as in fused_linear_cross_entropy, already validated.

    labels/task_ids are int64 [N] (task_ids all-zero when the caller gave none), chunk_size >= 1.
    Returns the loss (scalar, or [N] for reduction="none") in the compute dtype, and TaskStats.
    """
    args = (hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        if reduction == "none":
            loss, *stats = LinearCrossEntropyFunction.apply(*args)
        else:
            loss, *stats = SummedLinearCrossEntropyFunction.apply(*args)
        stats = TaskStats(*stats)
    else:
        # Nothing to differentiate: skip the autograd Function so nothing is saved for backward.
        loss, _, stats = _forward(*args)
    if reduction != "none" and loss.dim() == 1:
        loss = loss.sum()
    if reduction == "mean":
        # clamp keeps an all-ignored batch at 0 / 1 = 0 with zero grad instead of NaN, without a host sync.
        loss = loss / stats.tokens.sum().clamp(min=1)
    return loss, stats
