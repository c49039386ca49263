"""Chunked pure-PyTorch reference of the fused linear + cross-entropy loss with per-task stats.

Shapes: N tokens, H hidden size, V vocabulary size, T tasks, C rows per chunk.
Inputs reaching this module are already validated and contiguous (see fused_linear_cross_entropy.py).

Per token i with logits x = hidden[i] @ weight.T (+ bias), optionally soft-capped to
z = softcap * tanh(x / softcap), and lse = logsumexp(z):
    loss_i = lse - z[label_i] + z_loss * lse**2        (0 for ignored tokens)
TaskStats.loss_sum holds the cross-entropy part only; the z-loss part is returned per task apart.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

# Target size of one chunk of logits: bounds the transient memory of a chunk to ~64 MiB.
REFERENCE_CHUNK_BYTES = 64 * 2**20


class TaskStats(NamedTuple):
    """Detached per-task statistics of one loss call (all tensors have shape [T])."""

    loss_sum: torch.Tensor  # float32: sum of per-token cross-entropies of the task's non-ignored tokens
    tokens: torch.Tensor  # int64: number of non-ignored tokens of the task
    correct: torch.Tensor  # int64: non-ignored tokens whose argmax over the logits equals the label


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of logits/lse/accumulators: float64 stays float64 (exact tests), all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def auto_chunk_size(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that a chunk's [C, V] logits in the compute dtype take about 64 MiB."""
    itemsize = torch.finfo(compute_dtype(dtype)).bits // 8
    return max(1, REFERENCE_CHUNK_BYTES // (max(vocab, 1) * itemsize))


def _chunk_logits(hidden, weight_c, bias_c, rows, softcap, need_cap_grad=False):
    """[C, V] (soft-capped) logits of the rows in the compute dtype of `weight_c` (the upcast weight).

    Returns (z, dcap): dcap = dz/dx = 1 - (z / softcap)**2 when soft-capping and asked for, else None.
    """
    z = hidden[rows].to(weight_c.dtype) @ weight_c.T
    if bias_c is not None:
        z += bias_c
    dcap = None
    if softcap is not None:
        z = z.div_(softcap).tanh_()
        if need_cap_grad:
            dcap = 1.0 - z * z
        z = z.mul_(softcap)
    return z, dcap


def _forward(hidden, weight, bias, labels, task_ids, num_tasks, ignore_index, chunk_size, softcap, z_loss,
             grads=None):
    """Chunked forward pass.

    hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64, task_ids [N] int64.
    Returns per-token loss [N] and logsumexp [N] in the compute dtype, TaskStats with [T] tensors and
    the per-task z-loss sum [T] float32.
    `grads`: optional (grad_hidden [N, H] or None, grad_weight [V, H] or None, grad_bias [V] or None)
    compute-dtype buffers that receive the gradient of the summed loss while each chunk's logits exist.
    """
    n, dev, cdt = hidden.shape[0], hidden.device, compute_dtype(hidden.dtype)
    # Low-precision weights are upcast once so the matmul yields fp32 logits (the Triton kernel
    # instead accumulates bf16/fp16 tiles in fp32 registers and needs no copy); no-op for fp32/fp64.
    weight_c = weight.to(cdt)
    bias_c = None if bias is None else bias.to(cdt)
    loss = torch.empty(n, dtype=cdt, device=dev)
    lse = torch.empty(n, dtype=cdt, device=dev)
    loss_sum = torch.zeros(num_tasks, dtype=cdt, device=dev)
    z_sum = torch.zeros(num_tasks, dtype=cdt, device=dev)
    tokens = torch.zeros(num_tasks, dtype=torch.int64, device=dev)
    correct = torch.zeros(num_tasks, dtype=torch.int64, device=dev)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        logits, dcap = _chunk_logits(hidden, weight_c, bias_c, rows, softcap, need_cap_grad=grads is not None)
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
        c_ce = torch.where(valid, c_lse - target, 0.0)
        c_z = torch.where(valid, z_loss * c_lse * c_lse, 0.0)
        # Ignored tokens may carry any task id; route them to task 0, where they add only zeros.
        tid = torch.where(valid, task_ids[rows], 0)
        loss[rows], lse[rows] = c_ce + c_z, c_lse
        # index_add_ instead of boolean masking keeps the loop free of host syncs.
        loss_sum.index_add_(0, tid, c_ce)
        z_sum.index_add_(0, tid, c_z)
        tokens.index_add_(0, tid, valid.long())
        correct.index_add_(0, tid, hit.long())
        if grads is not None:
            _accumulate_grads(hidden, weight_c, probs.div_(total[:, None]), dcap, c_lse, z_loss, y, valid, None,
                              rows, *grads)
    return loss, lse, TaskStats(loss_sum.float(), tokens, correct), z_sum.float()


def _accumulate_grads(hidden, weight_c, softmax, dcap, lse, z_loss, y, valid, upstream, rows,
                      grad_hidden, grad_weight, grad_bias):
    """Gradient of the chunk's loss w.r.t. hidden rows, weight and bias.

    dloss/dz = softmax * (1 + 2 z_loss lse) - onehot(y); times dcap (soft-cap) and upstream.
    Overwrites `softmax` [C, V] (the chunk's own buffer). `upstream` [C] or None (= 1 for every token).
    """
    grad_logits = softmax
    if z_loss:
        grad_logits *= (1.0 + 2.0 * z_loss * lse)[:, None]
    grad_logits[torch.arange(y.shape[0], device=y.device), torch.where(valid, y, 0)] -= 1.0
    if dcap is not None:
        grad_logits *= dcap
    # Ignored tokens have a constant 0 loss: zero their row (and any inf/NaN upstream grad there).
    scale = valid.to(grad_logits.dtype) if upstream is None else torch.where(valid, upstream, 0.0)
    grad_logits *= scale[:, None]
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight_c
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T, hidden[rows].to(weight_c.dtype))
    if grad_bias is not None:
        grad_bias += grad_logits.sum(dim=0)


def _grad_buffers(hidden, weight, bias, need):
    """Compute-dtype gradient buffers (or None) for hidden, weight and bias."""
    cdt = compute_dtype(hidden.dtype)
    return (
        torch.zeros(hidden.shape, dtype=cdt, device=hidden.device) if need[0] else None,
        torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need[1] else None,
        torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need[2] else None,
    )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses [N] plus TaskStats; recomputes chunk logits in backward instead of storing them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, task_ids, num_tasks, ignore_index, chunk_size, softcap, z_loss):
        loss, lse, stats, z_sum = _forward(hidden, weight, bias, labels, task_ids, num_tasks, ignore_index,
                                           chunk_size, softcap, z_loss)
        # Only O(N) extra memory is saved (lse); hidden/weight/labels are the caller's own tensors.
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (ignore_index, chunk_size, softcap, z_loss)
        ctx.mark_non_differentiable(*stats, z_sum)
        return (loss, *stats, z_sum)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused_stat_grads):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, chunk_size, softcap, z_loss = ctx.options
        cdt = lse.dtype
        weight_c = weight.to(cdt)
        bias_c = None if bias is None else bias.to(cdt)
        grads = _grad_buffers(hidden, weight, bias, ctx.needs_input_grad[:3])
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            y = labels[rows]
            z, dcap = _chunk_logits(hidden, weight_c, bias_c, rows, softcap, need_cap_grad=True)
            softmax = z.sub_(lse[rows, None]).exp_()
            _accumulate_grads(hidden, weight_c, softmax, dcap, lse[rows], z_loss, y, y != ignore_index,
                              grad_loss[rows].to(cdt), rows, *grads)
        gh, gw, gb = (None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))
        return gh, gw, gb, None, None, None, None, None, None, None


class SummedLinearCrossEntropyFunction(torch.autograd.Function):
    """The summed loss (scalar) plus TaskStats, with the gradients computed during the forward.

    A scalar loss has a scalar upstream gradient, so the gradients can be formed while each chunk's
    logits exist and merely scaled in backward: one logits matmul per chunk instead of two.
    Holds grad_hidden [N, H] (input dtype), grad_weight [V, H] and grad_bias [V] (their dtypes,
    accumulated in fp32) from forward to backward; backward would allocate the same buffers anyway.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, task_ids, num_tasks, ignore_index, chunk_size, softcap, z_loss):
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        grads = _grad_buffers(hidden, weight, bias, need)
        loss, _, stats, z_sum = _forward(hidden, weight, bias, labels, task_ids, num_tasks, ignore_index,
                                         chunk_size, softcap, z_loss, grads=grads)
        ctx.grads = tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))
        ctx.mark_non_differentiable(*stats, z_sum)
        return (loss.sum(), *stats, z_sum)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused_stat_grads):
        # Kept on ctx (freed with the graph) so a retained graph can run backward again.
        scale = grad_loss.to(torch.float32 if grad_loss.dtype != torch.float64 else grad_loss.dtype)
        gh, gw, gb = (None if g is None else g * scale.to(g.dtype) for g in ctx.grads)
        return gh, gw, gb, None, None, None, None, None, None, None


def linear_cross_entropy_reference(
    hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction, chunk_size,
    bias=None, softcap=None, z_loss=0.0,
) -> tuple[torch.Tensor, TaskStats, torch.Tensor]:
    """Reference backend; arguments as in fused_linear_cross_entropy, already validated.

    labels/task_ids are int64 [N] (task_ids all-zero when the caller gave none), chunk_size >= 1.
    Returns the loss (scalar, or [N] for reduction="none") in the compute dtype, TaskStats and the
    per-task z-loss sum [T] float32.
    """
    args = (hidden, weight, bias, labels, task_ids, num_tasks, ignore_index, chunk_size, softcap, z_loss)
    needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        if reduction == "none":
            loss, *stats, z_sum = LinearCrossEntropyFunction.apply(*args)
        else:
            loss, *stats, z_sum = SummedLinearCrossEntropyFunction.apply(*args)
        stats = TaskStats(*stats)
    else:
        # Nothing to differentiate: skip the autograd Function so nothing is saved for backward.
        loss, _, stats, z_sum = _forward(*args)
    if reduction != "none" and loss.dim() == 1:
        loss = loss.sum()
    if reduction == "mean":
        # clamp keeps an all-ignored batch at 0 / 1 = 0 with zero grad instead of NaN, without a host sync.
        loss = loss / stats.tokens.sum().clamp(min=1)
    return loss, stats, z_sum
