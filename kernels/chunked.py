"""The chunked path (impl="chunked", the default for CUDA tensors): cuBLAS forms the logits of a chunk
of tokens, one Triton row kernel turns them into the loss, the statistics and the logit gradient, and
cuBLAS forms the chunk's dH and dW. Every matmul runs in cuBLAS; 6NHV FLOPs for a training step.

Shapes: N tokens, H hidden size, V vocabulary, T tasks; C_l tokens whose fp32 logits exist at once,
C_g tokens whose logit gradient feeds one dH/dW GEMM pair (a "group", C_l <= C_g).
Inputs reaching this module are validated and contiguous (see fused_linear_cross_entropy.py).

One training forward (reduction "sum"/"mean": the loss is a scalar, so its gradient is formed here
and backward only scales it by the incoming gradient, as kernels/reference.py does):
  for each group of C_g tokens:
    for each sub-chunk of C_l tokens:
      logits [C_l, V] fp32 = hidden[rows] @ W.T     cuBLAS: 16-bit operands, fp32 accumulation AND
                                                   output (the softmax sees no 16-bit rounding)
      _row_kernel, one program per token, reading its fp32 row twice from memory:
        pass 1: log-sum-exp (online, per lane), the label's logit, argmax (first index on ties, as
                torch), cross-entropy; -> lse, ce, hit [N]
        pass 2: dloss/dlogits = softmax * (1 + 2 z_loss lse) - onehot(label), times the soft-cap
                derivative, written in the input dtype into the group's gradient buffer G [C_g, V]
                (a separate buffer, not the logits); it runs last block first, so the blocks pass
                1 read last may still be in L2, but at C_l = 512 rows of 513 KB (V = 128256) the
                sub-chunk is 263 MB against an H100's 50 MB of L2: count the second read as HBM.
    dH[rows] = G @ W                                 cuBLAS, output in the input dtype
    dW += G.T @ hidden[rows]                         cuBLAS, fp32 compute, dW in the input dtype:
                                                   one rounding per group (as Liger-Kernel's addmm)
    dbias += G.sum(0) in fp32
  per-task sums of ce, z-loss, tokens and hits       a separate small kernel (task_stats.py), no atomics
Ignored tokens (label == ignore_index) read no logits (their gradient row is written as zeros);
the public entry point drops them before the GEMMs anyway.
reduction="none" keeps lse and runs the loop again in backward with the per-token incoming gradient
(8NHV, pass 1 skipped). Without gradients (evaluation) only the logits GEMM and pass 1 run (2NHV).
Backward of the summed loss scales dH and dW by the incoming gradient with the product formed in
fp32 (`scale_in_fp32_`), never with the factor rounded to 16 bits.

The token counts C_l and C_g come from a memory budget (chunk_plan.py says how, and why 1 GiB).
Memory beyond the inputs: the two buffers (`plan_chunks(...).bytes`), dW and dH in the input dtype,
per-token vectors; loss_memory_bytes in fused_linear_cross_entropy.py counts them all.
Deterministic by construction: no atomics (cuBLAS GEMMs, a row kernel, per-task sums in a fixed
order); bench/bench_loss.py --device cuda --check checks that two runs give the same bits (not yet run on a GPU).
Under TRITON_INTERPRET=1 (CPU tests) the GEMMs run in torch on upcast operands and the row kernel
writes fp32 gradient rows that torch rounds to 16 bits (the interpreter's own 16-bit stores truncate).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from .chunk_plan import plan_chunks
from .fp32_gemm import mm_fp32, mm_into_
from .reference import TaskStats
from .softcap import softcap_tanh
from .task_stats import per_task_sums

INTERPRETER_BLOCK_V = 1024  # the interpreter pays per op: few, wide blocks
MASKED_LOGIT = tl.constexpr(-3.0e38)  # below any finite fp32 logit a model produces


@triton.jit
def _row_kernel(x_ptr, b_ptr, y_ptr, lse_ptr, ce_ptr, hit_ptr, g_ptr, dx_ptr,
                V, ignore_index, softcap, z_loss,
                BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                STATS: tl.constexpr, GRAD: tl.constexpr, UPSTREAM: tl.constexpr):
    """One token's row of fp32 logits x [V] (+ bias, soft-capped).

    STATS: pass 1 -> lse, ce (lse - label's logit) and hit (argmax == label), 0 for ignored tokens.
    Else lse is read (backward of reduction="none"). GRAD: pass 2 -> the row of dloss/dlogits in
    dx (times the incoming gradient g[row] with UPSTREAM), zeros for ignored tokens.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * V
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    offs = tl.arange(0, BLOCK_V)
    if STATS:
        # Per-lane running max (= the lane's best logit), sum of exp, argmax and label logit;
        # lanes are merged once at the end, so the loop has no cross-lane reduction.
        run_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        best = tl.zeros((BLOCK_V,), dtype=tl.int32)
        target = tl.zeros((BLOCK_V,), dtype=tl.float32)
        v_end = tl.where(valid, V, 0)  # ignored tokens read nothing
        for v0 in range(0, v_end, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
            z = tl.load(x_row + cols, mask=mask, other=0.0)
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap_tanh(z, softcap)
            # Columns past V get a finite floor, not -inf: exp(floor - max) is 0 and no lane ever
            # computes -inf - -inf; such a lane cannot win the final max below.
            z = tl.where(mask, z, MASKED_LOGIT)
            new_max = tl.maximum(run_max, z)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
            best = tl.where(z > run_max, cols, best)  # strictly greater: a lane keeps its first maximum
            run_max = new_max
            target += tl.where(cols == y, z, 0.0)
        row_max = tl.where(valid, tl.max(run_max, axis=0), 0.0)
        total = tl.where(valid, tl.sum(run_sum * tl.exp(run_max - row_max), axis=0), 1.0)
        lse = tl.where(valid, row_max + tl.log(total), 0.0)
        arg = tl.min(tl.where(run_max == row_max, best, 2147483647), axis=0)  # first index of the row's max
        tl.store(lse_ptr + row, lse)
        tl.store(ce_ptr + row, tl.where(valid, lse - tl.sum(target, axis=0), 0.0))
        tl.store(hit_ptr + row, (valid & (arg == y)).to(tl.int32))
    else:
        lse = tl.load(lse_ptr + row)
    if GRAD:
        scale = 1.0 + 2.0 * z_loss * lse
        if UPSTREAM:
            scale_up = tl.load(g_ptr + row)
        else:
            scale_up = 1.0
        dx_row = dx_ptr + row * V
        n_blocks = tl.cdiv(V, BLOCK_V)
        for i in range(0, n_blocks):
            v0 = (n_blocks - 1 - i) * BLOCK_V  # reversed: the blocks pass 1 read last come first
            cols = v0 + offs
            mask = cols < V
            load_mask = mask & valid
            z = tl.load(x_row + cols, mask=load_mask, other=0.0)
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=load_mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap_tanh(z, softcap)
            d = tl.exp(z - lse) * scale - tl.where(cols == y, 1.0, 0.0)
            if HAS_SOFTCAP:
                t = z / softcap
                d = d * (1.0 - t * t)
            # where, not a product: an inf/NaN incoming gradient of an ignored token must not leak.
            d = tl.where(load_mask, d * scale_up, 0.0)
            tl.store(dx_row + cols, d.to(dx_ptr.dtype.element_ty), mask=mask)


# Hopper configurations of the row kernel, all compiled for sm_90 without spills by the tests
# (bench/results/kernels_sm90.md). The kernel is memory-bound: they trade loads in flight per program
# against programs resident per SM. One is fixed rather than autotuned: BLOCK_V sets the order of the
# per-lane sums, and a timing-based choice could change the bits from one run to the next.
ROW_CONFIGS = (dict(BLOCK_V=2048, num_warps=4), dict(BLOCK_V=4096, num_warps=8), dict(BLOCK_V=8192, num_warps=16))
GPU_ROW_CONFIG = ROW_CONFIGS[1]


def is_interpreting() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return isinstance(_row_kernel, InterpretedFunction)


def _row_kernel_launch(row_block: int | None, vocab: int) -> dict:
    """BLOCK_V and num_warps of the row kernel: as given, GPU_ROW_CONFIG on a GPU, wide blocks when interpreted."""
    if row_block is not None:
        return dict(BLOCK_V=row_block, num_warps=max(4, min(16, row_block // 512)))
    if is_interpreting():
        return dict(BLOCK_V=min(INTERPRETER_BLOCK_V, triton.next_power_of_2(vocab)), num_warps=4)
    return dict(GPU_ROW_CONFIG)


def _check_device(hidden: torch.Tensor) -> None:
    if hidden.device.type != "cuda" and not is_interpreting():
        raise RuntimeError(
            f'impl="chunked" needs CUDA tensors (got {hidden.device}); on a CPU its Triton row kernel runs only under '
            'the Triton interpreter, with TRITON_INTERPRET=1 set before msft_fast.kernels first runs it. Use '
            'impl="torch" or impl="auto" for CPU tensors.'
        )


def _chunk_loop(hidden, weight, bias, labels, plan, options, *, stats=None, lse=None, upstream=None, grads=None,
                row_block=None):
    """Run the chunks over all N tokens.

    stats: (lse, ce, hit) [N] outputs that pass 1 fills; without it `lse` [N] is read instead.
    grads: (dh [N, H], dw [V, H] in the input dtype, db [V] fp32), each or None, receiving the gradient
    of the summed loss (times `upstream` [N] fp32 when given); None: no pass 2, no GEMMs after it.
    """
    ignore_index, softcap, z_loss = options
    n, vocab = hidden.shape[0], weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    launch = _row_kernel_launch(row_block, vocab)
    need_grad = grads is not None
    dh, dw, db = grads if need_grad else (None, None, None)
    logits = torch.empty(plan.logit_rows, vocab, dtype=torch.float32, device=dev)
    grad_rows = torch.empty(plan.grad_rows, vocab, dtype=dtype, device=dev) if need_grad else None
    # The interpreter's 16-bit stores truncate: there the kernel writes fp32 and torch rounds (as a GPU would).
    staging = (torch.empty(plan.logit_rows, vocab, dtype=torch.float32, device=dev)
               if need_grad and is_interpreting() and dtype != torch.float32 else None)
    lse_out, ce_out, hit_out = stats if stats is not None else (lse, lse, lse)
    dummy = logits  # pointer arguments a mode does not read (never written)
    first_group = True
    group_rows = plan.grad_rows if need_grad else plan.logit_rows
    for g0 in range(0, n, group_rows):
        g1 = min(n, g0 + group_rows)
        for c0 in range(g0, g1, plan.logit_rows):
            c1 = min(g1, c0 + plan.logit_rows)
            x = logits[: c1 - c0]
            mm_fp32(hidden[c0:c1], weight.t(), out=x)
            dx = None
            if need_grad:
                dx = staging[: c1 - c0] if staging is not None else grad_rows[c0 - g0:c1 - g0]
            _row_kernel[(c1 - c0,)](
                x, bias if bias is not None else dummy, labels[c0:c1],
                lse_out[c0:c1], ce_out[c0:c1], hit_out[c0:c1],
                upstream[c0:c1] if upstream is not None else dummy, dx if dx is not None else dummy,
                vocab, ignore_index, 1.0 if softcap is None else float(softcap), float(z_loss),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, STATS=stats is not None,
                GRAD=need_grad, UPSTREAM=upstream is not None, **launch,
            )
            if staging is not None:
                grad_rows[c0 - g0:c1 - g0].copy_(dx)
        if not need_grad:
            continue
        g_rows = grad_rows[: g1 - g0]
        if dh is not None:
            torch.mm(g_rows, weight, out=dh[g0:g1])
        if dw is not None:  # the first group writes dW, later ones add to it (fp32 sums, rounded once each)
            mm_into_(dw, g_rows.t(), hidden[g0:g1], accumulate=not first_group)
        if db is not None:
            db += g_rows.sum(0, dtype=torch.float32)
        first_group = False
    if need_grad and first_group and dw is not None:  # no token at all
        dw.zero_()


def _grad_buffers(hidden, weight, bias, need):
    """dh [N, H] and dw [V, H] in the input dtype (every row of dh written; dw written by the first
    group), db [V] fp32. dW is accumulated in its own dtype: an fp32 accumulator beside its 16-bit
    copy held 4 bytes per head weight more (4.6 GB beyond the inputs at 16384 x 4096 x 128256 against
    2.4 GB now), for one rounding of the sum instead of one per group (six groups there)."""
    dev = hidden.device
    return (torch.empty_like(hidden) if need[0] else None,
            torch.empty_like(weight) if need[1] else None,
            torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need[2] else None)


SCALE_BLOCK = 1 << 22  # elements of a 16-bit gradient scaled through fp32 at a time (16 MiB of fp32)


def scale_in_fp32_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad *= factor with the product formed in fp32 and rounded once to grad's dtype: a 16-bit
    grad times an fp32 factor would otherwise round the factor to 16 bits first (1/N to bf16 is off
    by up to 0.4%), biasing every gradient. Blocks bound the fp32 temporary; no host sync."""
    factor = factor.to(torch.float32)
    if grad.dtype == torch.float32:
        grad.mul_(factor)
        return
    flat = grad.view(-1)
    for start in range(0, flat.numel(), SCALE_BLOCK):
        block = flat[start:start + SCALE_BLOCK]
        block.copy_(block.float().mul_(factor))


def _forward_stats(hidden, weight, bias, labels, task_ids, num_tasks, options, plan, grads=None, row_block=None):
    """Pass 1 over every token (and the gradient of the summed loss into `grads`).

    Returns per-token loss [N] fp32 (cross-entropy + z-loss, 0 for ignored tokens), lse [N], TaskStats
    and the per-task z-loss sum [T].
    """
    ignore_index, _, z_loss = options
    n, dev = hidden.shape[0], hidden.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    ce = torch.empty(n, dtype=torch.float32, device=dev)
    hit = torch.empty(n, dtype=torch.int32, device=dev)
    if n > 0:
        _chunk_loop(hidden, weight, bias, labels, plan, options, stats=(lse, ce, hit), grads=grads,
                    row_block=row_block)
    elif grads is not None and grads[1] is not None:
        grads[1].zero_()
    stats, z_sum = per_task_sums(ce, lse, hit, labels, task_ids, num_tasks, ignore_index, z_loss)
    return ce + z_loss * lse * lse, lse, stats, z_sum  # lse is 0 at ignored tokens


class ChunkedSumFunction(torch.autograd.Function):
    """The summed loss (scalar) plus TaskStats; gradients formed in forward, scaled in backward.

    Holds dH [N, H], dW [V, H] and dbias [V] (the inputs' dtypes, accumulated in fp32) from forward to
    backward, which scales them in place and hands them out: backward runs once per forward (a
    retained graph cannot run it twice; impl="torch" can).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, task_ids, num_tasks, options, chunking, row_block):
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        plan = plan_chunks(hidden.shape[0], weight.shape[0], hidden.dtype, True, *chunking)
        grads = _grad_buffers(hidden, weight, bias, need)
        loss, _, stats, z_sum = _forward_stats(hidden, weight, bias, labels, task_ids, num_tasks, options, plan,
                                               grads=grads, row_block=row_block)
        # Kept in the inputs' dtypes (dbias is accumulated in fp32; it is V floats).
        ctx.grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias))]
        ctx.mark_non_differentiable(*stats, z_sum)
        return (loss.sum(), *stats, z_sum)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused_stat_grads):
        if ctx.grads is None:
            raise RuntimeError('impl="chunked" forms the gradients in forward and hands them out in the first backward; '
                               'it cannot run backward twice on one forward (retain_graph). Use impl="torch" for that.')
        grads, ctx.grads = ctx.grads, None
        for g in grads:
            if g is not None:
                scale_in_fp32_(g, grad_loss)
        return (*grads, None, None, None, None, None, None)


class ChunkedPerTokenFunction(torch.autograd.Function):
    """Per-token losses [N] plus TaskStats; backward recomputes the chunks with the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, task_ids, num_tasks, options, chunking, row_block):
        plan = plan_chunks(hidden.shape[0], weight.shape[0], hidden.dtype, False, *chunking)
        loss, lse, stats, z_sum = _forward_stats(hidden, weight, bias, labels, task_ids, num_tasks, options,
                                                 plan, row_block=row_block)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options, ctx.chunking, ctx.row_block = options, chunking, row_block
        ctx.mark_non_differentiable(*stats, z_sum)
        return (loss, *stats, z_sum)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused_stat_grads):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grads = _grad_buffers(hidden, weight, bias, ctx.needs_input_grad[:3])
        if hidden.shape[0] > 0 and any(g is not None for g in grads):
            plan = plan_chunks(hidden.shape[0], weight.shape[0], hidden.dtype, True, *ctx.chunking)
            _chunk_loop(hidden, weight, bias, labels, plan, ctx.options, lse=lse, grads=grads,
                        upstream=grad_loss.to(torch.float32).contiguous(), row_block=ctx.row_block)
        elif grads[1] is not None:
            grads[1].zero_()
        out = [None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias))]
        return (*out, None, None, None, None, None, None)


def linear_cross_entropy_chunked(
    hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction,
    bias=None, softcap=None, z_loss=0.0, chunk_bytes=None, chunk_size=None, row_block=None,
) -> tuple[torch.Tensor, TaskStats, torch.Tensor]:
    """Chunked backend; arguments as in fused_linear_cross_entropy, already validated.

    hidden [N, H] and weight [V, H] float16/bfloat16/float32 contiguous, bias [V] or None,
    labels/task_ids int64 [N]. chunk_bytes/chunk_size: see plan_chunks; row_block: the row
    kernel's block (None: GPU_ROW_CONFIG on a GPU). Returns the float32 loss (scalar, or [N] for
    reduction="none"), TaskStats and the per-task z-loss sum [T] float32.
    """
    _check_device(hidden)
    options = (ignore_index, softcap, float(z_loss))
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    summed = reduction != "none"
    chunking = (chunk_bytes, chunk_size)
    on_device = torch.cuda.device(hidden.device) if hidden.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        if not needs_grad:
            plan = plan_chunks(hidden.shape[0], weight.shape[0], hidden.dtype, False, *chunking)
            loss, _, stats, z_sum = _forward_stats(hidden, weight, bias, labels, task_ids, num_tasks, options, plan,
                                                   row_block=row_block)
        else:
            fn = ChunkedSumFunction if summed else ChunkedPerTokenFunction
            loss, *stats, z_sum = fn.apply(hidden, weight, bias, labels, task_ids, num_tasks, options, chunking,
                                           row_block)
            stats = TaskStats(*stats)
    if summed and loss.dim() == 1:
        loss = loss.sum()
    if reduction == "mean":
        loss = loss / stats.tokens.sum().clamp(min=1)
    return loss, stats, z_sum
