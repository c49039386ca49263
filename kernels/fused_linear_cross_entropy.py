"""Public entry point: validation and backend dispatch of the fused linear + cross-entropy loss."""

from __future__ import annotations

import torch

from .reference import TaskStats, auto_chunk_size, linear_cross_entropy_reference

_REDUCTIONS = ("sum", "mean", "none")
_IMPLS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor | None = None,
    num_tasks: int = 0,
    ignore_index: int = -100,
    reduction: str = "sum",
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, TaskStats]:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising the [N, V] logits.

    Args:
        hidden: [N, H] final hidden states, float16/bfloat16/float32/float64.
        weight: [V, H] LM-head weight, same dtype and device as ``hidden``.
        labels: [N] integer target ids in [0, V), or ``ignore_index`` for tokens without a loss.
        task_ids: [N] integer task of each token, in [0, num_tasks) for non-ignored tokens;
            None puts every token in task 0.
        num_tasks: T, the number of tasks (>= 1 when ``task_ids`` is given); without task_ids
            T = max(num_tasks, 1).
        ignore_index: label value of tokens that contribute no loss and are not counted.
        reduction: "sum" -> scalar sum over non-ignored tokens; "mean" -> that sum divided by the
            number of non-ignored tokens (0.0 when there are none); "none" -> [N] per-token losses,
            0 at ignored positions.
        impl: "auto" (best available backend), "torch" (chunked reference) or "triton" (not yet available).
        chunk_size: tokens per chunk; None picks it so a chunk's fp32 logits take about 64 MiB.

    Returns:
        (loss, stats): loss in float32 (float64 for float64 inputs), differentiable in ``hidden``
        and ``weight`` with gradients in their own dtypes; stats is a detached TaskStats whose
        loss_sum [T] float32, tokens [T] int64 and correct [T] int64 (argmax of the logits equals
        the label) are computed in the same pass.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}.")
    if impl == "triton":
        raise NotImplementedError(
            'The Triton fused linear cross-entropy kernel is not available yet; use impl="torch" or impl="auto".'
        )
    hidden, weight, labels, task_ids, num_tasks = _validate(
        hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size
    )
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0], hidden.dtype)
    # impl == "auto" | "torch": the chunked reference on every device. When the Triton kernel lands,
    # "auto" should route CUDA tensors to it here and keep the reference for everything else.
    return linear_cross_entropy_reference(
        hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction, chunk_size
    )


def _validate(hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size):
    """Check shapes, dtypes and value ranges; return contiguous inputs, int64 ids and the task count T."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}.")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be 2-D [V, H] with H={hidden.shape[1]}, got shape {tuple(weight.shape)}.")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1).")
    if hidden.device != weight.device:
        raise ValueError(f"hidden and weight must be on the same device, got {hidden.device} and {weight.device}.")
    if hidden.dtype != weight.dtype or hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"hidden and weight must share one dtype of {_FLOAT_DTYPES}, got {hidden.dtype} and {weight.dtype}."
        )
    n, vocab = hidden.shape[0], weight.shape[0]
    if labels.shape != (n,) or labels.dtype not in _INT_DTYPES:
        raise ValueError(f"labels must be a 1-D integer tensor of length N={n}, got {labels.dtype} {tuple(labels.shape)}.")
    if labels.device != hidden.device:
        raise ValueError(f"labels must be on the device of hidden ({hidden.device}), got {labels.device}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}.")
    labels = labels.long()
    valid = labels != ignore_index
    # .item() syncs with the device once per check; acceptable for the reference path.
    if (valid & ((labels < 0) | (labels >= vocab))).any().item():
        raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}.")
    if task_ids is None:
        if num_tasks < 0:
            raise ValueError(f"num_tasks must be >= 0, got {num_tasks}.")
        task_ids, num_tasks = torch.zeros_like(labels), max(num_tasks, 1)
    else:
        if task_ids.shape != (n,) or task_ids.dtype not in _INT_DTYPES:
            raise ValueError(
                f"task_ids must be a 1-D integer tensor of length N={n}, got {task_ids.dtype} {tuple(task_ids.shape)}."
            )
        if task_ids.device != hidden.device:
            raise ValueError(f"task_ids must be on the device of hidden ({hidden.device}), got {task_ids.device}.")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1 when task_ids is given, got {num_tasks}.")
        task_ids = task_ids.long()
        if (valid & ((task_ids < 0) | (task_ids >= num_tasks))).any().item():
            raise ValueError(f"task ids of non-ignored tokens must lie in [0, num_tasks={num_tasks}).")
    return hidden.contiguous(), weight.contiguous(), labels.contiguous(), task_ids.contiguous(), num_tasks
