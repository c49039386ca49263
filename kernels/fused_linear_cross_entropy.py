"""Public entry point: validation, backend dispatch and memory accounting of the fused linear +
cross-entropy loss."""

from __future__ import annotations

import importlib
import math

import torch

from .chunk_plan import plan_chunks
from .reference import REFERENCE_CHUNK_BYTES, TaskStats, auto_chunk_size, linear_cross_entropy_reference

_REDUCTIONS = ("sum", "mean", "none")
_IMPLS = ("auto", "torch", "triton", "chunked")
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
    chunk_bytes: int | None = None,
    filter_eps: float | str | None = None,
    num_valid: int | None = None,
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
        impl: which backend computes it (all return the same values up to float rounding):
            "auto" -> "chunked" for CUDA tensors of float16/bfloat16/float32 (any reduction), the
            reference ("torch") otherwise (CPU tensors, float64);
            "chunked" -> cuBLAS logits per chunk of tokens, one Triton row kernel for loss, statistics
            and logit gradient, cuBLAS dH/dW (kernels/chunked.py; 6NHV FLOPs for sum/mean,
            deterministic). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
            "triton" -> the tiled Cut-Cross-Entropy-style kernel: logits only as register tiles,
            recomputed in backward (kernels/triton_flce.py; 8NHV FLOPs, atomics in backward).
            CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
            "torch" -> the chunked PyTorch reference (kernels/reference.py).
        chunk_size: tokens whose logits exist at once: the reference's chunk (None: about 64 MiB of
            fp32 logits) and the chunked path's sub-chunk (None: from ``chunk_bytes``). The tiled
            kernel does not chunk and ignores it.
        bias: optional [V] LM-head bias (same dtype and device as ``weight``), differentiable.
        softcap: optional positive float; logits become softcap * tanh(logits / softcap) (Gemma 2).
        z_loss: weight of the auxiliary z-loss, z_loss * logsumexp(logits)**2 per non-ignored token,
            added to the returned loss (PaLM); 0 disables it.
        return_z_loss: also return the z-loss part of the loss, per task.
        chunk_bytes: memory budget in bytes of the chunked path's transient buffers (fp32 logits of a
            sub-chunk and 16-bit logit gradient of a group; kernels/chunk_plan.py); None: 1 GiB. Only
            the chunked path reads it.
        filter_eps: the tiled kernel's (impl="triton") gradient filter, off by default: None keeps the
            gradients exact; a float skips, in backward, every [tokens x vocabulary] tile whose
            |dloss/dlogit| (before the incoming gradient) stays below it; "auto" is
            torch.finfo(dtype).eps / 32 (2**-12 for bfloat16), below what the 16-bit gradient can hold
            relative to its largest entries. Any other impl refuses it.
        num_valid: the number of tokens whose label is not ``ignore_index``, when the caller knows it
            (a trainer counts them on the host while it packs the batch). None: the call counts them
            and checks the label and task-id ranges on the host, one host sync per call; given, the
            call makes no host sync, and the same checks (and the count) become one device-side
            assertion: a CPU call raises RuntimeError at once, a GPU one fails its CUDA context at a
            later synchronisation, so pass it only for ids checked before (the trainer checks every
            token id against the vocabulary when it loads the data).

    Tokens whose label is ``ignore_index`` are dropped before any matmul (their count comes from
    ``num_valid`` or one host sync), so prompt tokens cost nothing beyond that gather.

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
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes < 1):
        raise ValueError(f"chunk_bytes must be a positive number of bytes or None, got {chunk_bytes!r}.")
    backend = choose_backend(impl, hidden.device, hidden.dtype)
    filter_eps = _validate_filter(filter_eps, backend, impl, hidden.dtype)
    hidden, weight, labels, task_ids, num_tasks, kept = _validate(
        hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size, num_valid
    )
    bias, softcap, z_loss = _validate_options(hidden, weight, bias, softcap, z_loss)
    n = hidden.shape[0]
    if kept is not None:  # drop the ignored tokens: no matmul is spent on them
        hidden, labels, task_ids = hidden.index_select(0, kept), labels[kept], task_ids[kept]
    args = (hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction)
    options = dict(bias=bias, softcap=softcap, z_loss=z_loss)
    if backend == "triton":
        loss, stats, z_sum = _import_backend("triton", "triton_flce", "linear_cross_entropy_triton")(
            *args, **options, filter_eps=filter_eps)
    elif backend == "chunked":
        loss, stats, z_sum = _import_backend("chunked", "chunked", "linear_cross_entropy_chunked")(
            *args, **options, chunk_bytes=chunk_bytes, chunk_size=chunk_size)
    else:
        if chunk_size is None:
            chunk_size = auto_chunk_size(weight.shape[0], hidden.dtype)
        loss, stats, z_sum = linear_cross_entropy_reference(*args, chunk_size, **options)
    if kept is not None and reduction == "none":  # per-token losses back in place, 0 where ignored
        loss = loss.new_zeros(n).index_copy(0, kept, loss)
    return (loss, stats, z_sum) if return_z_loss else (loss, stats)


def _import_backend(impl: str, module: str, name: str):
    """A Triton backend's entry point; triton is imported only when one is asked for."""
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except ImportError as err:
        raise RuntimeError(f'impl="{impl}" needs the triton package, which failed to import: {err}') from err


def choose_backend(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend ("chunked", "triton" or "torch") that ``impl`` picks for inputs of this device and dtype."""
    if impl in ("triton", "chunked") and dtype == torch.float64:
        raise ValueError(f'impl="{impl}" takes float16, bfloat16 or float32 inputs; use impl="torch" for float64.')
    if impl == "auto":
        return "chunked" if device.type == "cuda" and dtype != torch.float64 else "torch"
    return impl


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    """The tiled kernel's gradient-filter threshold: None (exact), a float, or "auto" = finfo(dtype).eps / 32."""
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    return None if filter_eps is None else float(filter_eps)


def _validate_filter(filter_eps, backend: str, impl: str, dtype: torch.dtype) -> float | None:
    if filter_eps is None:
        return None
    ok = filter_eps == "auto" or (isinstance(filter_eps, (int, float)) and not isinstance(filter_eps, bool)
                                  and 0 < filter_eps < 1)
    if not ok:
        raise ValueError(f'filter_eps must be None, "auto" or a number in (0, 1), got {filter_eps!r}.')
    if backend != "triton":
        raise ValueError(f'filter_eps applies to the tiled kernel (impl="triton") only; impl="{impl}" runs the '
                         f'{backend} backend, whose gradients are exact.')
    return resolve_filter_eps(filter_eps, dtype)


# Per-token vectors of the chunked path alive at its peak (lse, ce, hit: 12 bytes) plus slack for the
# per-task sums' small tensors; the gathered rows' labels, task ids, the mask and the sort that finds
# them (40 bytes a token, at most).
CHUNKED_PER_TOKEN = 16
GATHER_PER_TOKEN = 40
SMALL_BYTES = 8192


def loss_memory_bytes(n: int, hidden_size: int, vocab: int, dtype: torch.dtype, *, device_type: str = "cuda",
                      impl: str = "auto", chunk_bytes: int | None = None, training: bool = True,
                      bias: bool = False, ignored: bool = True) -> int:
    """Bytes one call allocates beyond its inputs for n tokens at its peak (the memory preflight uses
    it); tests/test_loss_memory.py ties the chunked figure to the allocations of a real call.

    chunked, training: the chunk buffers (chunk_plan.plan_chunks: fp32 logits of a sub-chunk, the
    group's gradient rows), dW [V, H] and dH [N, H] in `dtype` (dW accumulated in its own dtype,
    see chunked.py), dbias [V] fp32 with `bias`, per-token vectors. `ignored`: some tokens carry no
    label, so the kept tokens' hidden rows are gathered first (and their labels and task ids): the
    figure is then an upper bound for any share of ignored tokens. Evaluation: the logits buffer.
    torch (the reference): fp32 gradient buffers for hidden and head, the head upcast to fp32 when
    `dtype` is 16-bit, and about 3 x 64 MiB of fp32 logit chunks.
    triton (tiled): fp32 dH and dW buffers and their copies in `dtype`, O(N) partials; with 16-bit
    inputs one more fp32 [V, H] for the GEMM backward's fallback where torch cannot add an fp32
    product in place (fp32_gemm.addmm_fp32_), counted always: an upper bound.
    """
    c = torch.finfo(dtype).bits // 8
    backend = choose_backend(impl, torch.device(device_type), dtype)
    nh, vh = n * hidden_size, vocab * hidden_size
    gather = (c * nh + GATHER_PER_TOKEN * n) if ignored else 0
    if backend == "chunked":
        plan = plan_chunks(n, vocab, dtype, training, chunk_bytes)
        grads = c * vh + c * nh + (4 * vocab if bias else 0) if training else 0
        return plan.bytes + grads + gather + CHUNKED_PER_TOKEN * n + SMALL_BYTES
    per_token = 64 * n  # labels, ids, lse, losses, statistics
    gather += c * nh if training and ignored else 0  # the scattered-back gradient of the gathered rows
    if not training:
        return (REFERENCE_CHUNK_BYTES if backend == "torch" else 0) + gather + per_token
    upcast = c < 4
    if backend == "torch":
        return (4 * vh + (4 * vh + c * vh if upcast else 0) + 4 * nh + (c * nh if upcast else 0)
                + 3 * REFERENCE_CHUNK_BYTES + gather + per_token)
    return 4 * vh + 4 * nh + ((c * vh + c * nh + 4 * vh) if upcast else 0) + gather + per_token


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


def _validate(hidden, weight, labels, task_ids, num_tasks, ignore_index, chunk_size, num_valid):
    """Check shapes, dtypes and value ranges (on the host, or on the device given ``num_valid``).

    Returns contiguous inputs, int64 labels and task ids, the task count T and the indices [N'] of
    the non-ignored tokens (None when every token carries a loss).
    """
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
    bad_labels = valid & ((labels < 0) | (labels >= vocab))
    if task_ids is None:
        if num_tasks < 0:
            raise ValueError(f"num_tasks must be >= 0, got {num_tasks}.")
        task_ids, num_tasks = torch.zeros_like(labels), max(num_tasks, 1)
        bad_tasks = torch.zeros_like(valid)
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
        bad_tasks = valid & ((task_ids < 0) | (task_ids >= num_tasks))
    if num_valid is None:
        # The one host sync of a call: both checks and the number of tokens that carry a loss.
        any_bad_label, any_bad_task, n_valid = torch.stack(
            [bad_labels.any().long(), bad_tasks.any().long(), valid.sum()]).tolist()
        if any_bad_label:
            raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}.")
        if any_bad_task:
            raise ValueError(f"task ids of non-ignored tokens must lie in [0, num_tasks={num_tasks}).")
    else:
        if isinstance(num_valid, bool) or not isinstance(num_valid, int) or not 0 <= num_valid <= n:
            raise ValueError(f"num_valid must be None or an integer in [0, N={n}], got {num_valid!r}.")
        n_valid = num_valid
        # No host sync: the same checks, and the caller's count, as one device-side assertion.
        torch._assert_async(~(bad_labels.any() | bad_tasks.any()) & (valid.sum() == n_valid),
                            f"num_valid={n_valid} must count the labels other than ignore_index={ignore_index}, "
                            f"labels must lie in [0, V={vocab}) and task ids in [0, num_tasks={num_tasks})")
    # Indices of the tokens with a loss, in order (a stable sort: no second sync); None when all have one.
    kept = None if n_valid == n else torch.argsort((~valid).to(torch.uint8), stable=True)[:n_valid]
    return hidden.contiguous(), weight.contiguous(), labels.contiguous(), task_ids.contiguous(), num_tasks, kept
