"""Public entry point: validation and backend dispatch of the fused linear + cross-entropy loss."""

from __future__ import annotations

import math

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
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
) -> tuple[torch.Tensor, TaskStats] | tuple[torch.Tensor, TaskStats, torch.Tensor]:
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
        impl: "auto" -> the Triton kernel for CUDA tensors of float16/bfloat16/float32, the
            reference otherwise (CPU tensors, float64); "triton" forces the kernel (CUDA tensors, or
            CPU tensors under TRITON_INTERPRET=1); "torch" forces the chunked PyTorch reference.
        chunk_size: tokens per chunk of the reference; None picks it so a chunk's fp32 logits take
            about 64 MiB. The Triton kernel does not chunk and ignores it.
        bias: optional [V] LM-head bias (same dtype and device as ``weight``), differentiable.
        softcap: optional positive float; logits become softcap * tanh(logits / softcap) (Gemma 2).
        z_loss: weight of the auxiliary z-loss, z_loss * logsumexp(logits)**2 per non-ignored token,
            added to the returned loss (PaLM); 0 disables it.
        return_z_loss: also return the z-loss part of the loss, per task.

    Returns:
        (loss, stats), or (loss, stats, z_loss_sum) with ``return_z_loss``: loss in float32 (float64
        for float64 inputs on the reference) includes the z-loss, and is differentiable in ``hidden``,
        ``weight`` and ``bias`` with gradients in their own dtypes; stats is a detached TaskStats whose
        loss_sum [T] float32 (cross-entropy only, without the z-loss), tokens [T] int64 and
        correct [T] int64 (argmax of the logits equals the label) come from the same pass;
        z_loss_sum [T] float32 (detached) is the z-loss summed per task.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}.")
    hidden, weight, labels, task_ids, num_tasks = _validate(
        hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size
    )
    bias, softcap, z_loss = _validate_options(hidden, weight, bias, softcap, z_loss)
    if choose_backend(impl, hidden.device, hidden.dtype) == "triton":
        try:
            from .triton_flce import linear_cross_entropy_triton  # imports triton: only when asked for
        except ImportError as err:
            raise RuntimeError(f'impl="triton" needs the triton package, which failed to import: {err}') from err
        loss, stats, z_sum = linear_cross_entropy_triton(
            hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction,
            bias=bias, softcap=softcap, z_loss=z_loss,
        )
    else:
        if chunk_size is None:
            chunk_size = auto_chunk_size(weight.shape[0], hidden.dtype)
        loss, stats, z_sum = linear_cross_entropy_reference(
            hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction, chunk_size,
            bias=bias, softcap=softcap, z_loss=z_loss,
        )
    return (loss, stats, z_sum) if return_z_loss else (loss, stats)


def choose_backend(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend ("triton" or "torch") that ``impl`` picks for inputs of this device and dtype."""
    if impl == "triton" and dtype == torch.float64:
        raise ValueError('impl="triton" takes float16, bfloat16 or float32 inputs; use impl="torch" for float64.')
    if impl == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    return impl


def _validate_options(hidden, weight, bias, softcap, z_loss):
    """Check bias [V], softcap > 0 and z_loss >= 0; return the contiguous bias and plain floats."""
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a 1-D tensor of length V={weight.shape[0]}, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}.")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must have the dtype and device of weight ({weight.dtype}, {weight.device}), "
                             f"got {bias.dtype}, {bias.device}.")
        bias = bias.contiguous()
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (0 < softcap < math.inf):
            raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}.")
        softcap = float(softcap)
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not (0 <= z_loss < math.inf):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}.")
    return bias, softcap, float(z_loss)


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
