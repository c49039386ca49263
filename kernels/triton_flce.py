"""Triton fused linear + cross-entropy with per-task statistics; the [N, V] logits never reach memory.

Shapes: N tokens, H hidden size, V vocabulary size, T tasks, S vocabulary splits.
Inputs reaching this module are already validated and contiguous (see fused_linear_cross_entropy.py).

Design (Cut Cross-Entropy's, not Liger's). Liger chunks the tokens, runs cuBLAS for the
[chunk, V] logits and Triton for the row-wise softmax, so every chunk's logits and their gradient
still make a round trip through HBM (2 x chunk x V x 2 bytes written and read again) and the chunk
size trades memory against speed. Here the logits exist only as [BLOCK_M, BLOCK_V] fp32 tiles in
registers:
  1. `_fwd_kernel`, grid (N / BLOCK_M, S): each program owns BLOCK_M tokens and one slice of the
     vocabulary; per V tile it forms the logit tile with `tl.dot` over H (fp32 accumulation), adds
     the bias, soft-caps, and folds the tile into an online log-sum-exp, a running argmax and the
     label's logit. It writes O(S x N) partials. Splitting V keeps the GPU full when N / BLOCK_M
     is below the number of SMs (8192 tokens / 128 = 64 row blocks on a 132-SM H100).
  2. `_combine_kernel`, grid (N / BLOCK_N): merges the S partials into lse, the per-token loss
     and the argmax hit, and reduces loss, z-loss, token and hit counts per task with a one-hot
     [BLOCK_N, T] reduction into per-block partials (summed by torch: deterministic, no atomics).
     This is the only cost of the per-task statistics: O(N x T) work on data already in registers.
  3. `_bwd_kernel` (backward="fused", the default), grid (N / BLOCK_M, V / BLOCK_V): recomputes one
     logit tile from hidden, weight and the saved lse, forms
     dlogits = g * (softmax * (1 + 2 z_loss lse) - onehot) * softcap' in registers and accumulates
     dH += dlogits @ W and dW += dlogits.T @ hidden (and dbias) with fp32 atomics into fp32
     buffers, in one loop over H that loads each W and hidden tile once. 3 matmuls (recompute, dH,
     dW) and no [N, V] buffer; the price is run-to-run bit noise in the gradients (atomic order).
Gradients are exact: no softmax-sparsity filtering of tiles (CCE's default) is applied.
Memory beyond the inputs: O(N x S) partials and lse in forward; the fp32 dH [N, H] and dW [V, H]
buffers in backward (the gradient itself for fp32 inputs; an extra fp32 copy for bf16/fp16).

The risk of the fused backward, and the alternative kept beside it. Every (token block, V tile)
program adds a [BLOCK_M, H] slice to dH and a [BLOCK_V, H] slice to dW, so the atomics move
4 N V H (1/BLOCK_M + 1/BLOCK_V) bytes: about 270 GB at 8192 x 4096 x 128256 with 128 x 128 tiles,
against ~26 TFLOP of backward matmuls. Unless the L2 absorbs that at several TB/s the backward is
atomic-bound (CCE avoids most of it by skipping tiles whose softmax is negligible). Hence
backward="gemm" (TritonBlocks.backward): `_dlogits_kernel` writes a token chunk's dlogits
[C, V] in the input dtype (the same fused recompute, no atomics except the [V] dbias) and cuBLAS
forms dH = dlogits @ W and dW += dlogits.T @ hidden, fp32-accumulated across chunks. It is
deterministic, runs its two GEMMs at cuBLAS speed, and pays 2 x C x V x 2 bytes of HBM traffic
per chunk plus the chunk buffer (TritonBlocks.gemm_chunk_bytes, 1 GiB). Which one wins on an
H100/H200 is the first thing to measure (bench/bench_loss.py --device cuda times both).

What needs tuning on a GPU (nothing here was timed on one; see bench/bench_loss.py):
  - BLOCK_M/BLOCK_V/BLOCK_K, num_warps and num_stages per kernel. The defaults (GPU_BLOCKS) are only
    known to compile for sm_90 into pipelined wgmma code without register spills; their speed is
    unmeasured. A `triton.autotune` over a few configs keyed on (H, V, dtype) would pick them; the
    backward then needs `reset_to_zero` for its atomic buffers. Loads are only pipelined when H
    is a multiple of 16 (Triton's divisibility specialisation), which every real model has.
  - the number of V splits S (now: enough programs for about two waves of SMs);
  - program order: a grouped (swizzled) launch order for L2 reuse of weight tiles, and, in the
    backward, to spread the atomics on one dW tile over time;
  - soft-capping uses tanh through exp (Triton has no tanh); `tanh.approx.f32` inline PTX is faster.
Under TRITON_INTERPRET=1 (CPU tests) 16-bit tiles are upcast to fp32 at load because the
interpreter mishandles bf16; on a GPU the dots take bf16/fp16 operands directly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import TaskStats


@dataclass(frozen=True)
class TritonBlocks:
    """Tile sizes and launch options of the three kernels (each block >= 16, powers of two)."""

    block_m: int = 128  # tokens per program (forward and backward)
    block_v: int = 128  # vocabulary columns per tile
    block_k: int = 64  # hidden columns per dot step
    v_splits: int | None = None  # vocabulary slices of the forward grid; None: fill the GPU
    block_n: int = 128  # tokens per program of the combine kernel
    num_warps: int = 8
    num_stages: int = 3
    # "fused": one kernel, dH/dW accumulated with fp32 atomics (3 matmuls, run-to-run bit noise).
    # "gemm": Triton writes a token chunk's dlogits [C, V] in the input dtype, cuBLAS forms dH and
    # dW from it (deterministic, no atomics; costs the chunk buffer and its HBM round trip).
    backward: str = "fused"
    gemm_chunk_bytes: int = 1 << 30  # dlogits buffer of the "gemm" backward


# GPU defaults per input dtype, checked by compiling for sm_90 (ptxas, no GPU needed; see
# tests/test_loss_triton.py): these pipeline their loads (cp.async, 3 stages) into wgmma without
# register spills. 16-bit: forward 98 KiB / backward 160 KiB shared memory. fp32 (3xTF32 dots)
# spills at 128x128 tiles, hence smaller ones. Not timed on a GPU: a starting point for tuning.
GPU_BLOCKS = {
    torch.bfloat16: TritonBlocks(),
    torch.float16: TritonBlocks(),
    torch.float32: TritonBlocks(block_m=64, block_v=64, block_k=32),
}
# fp32 inputs: 3xTF32 dots, close to fp32 accuracy on the tensor cores (torch's default fp32 matmul
# is not plain TF32 either; exact "ieee" dots cannot use wgmma and spill at these tiles). For 16-bit
# operands the setting is moot: they go to the tensor cores as they are, accumulating in fp32.
DOT_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "tf32x3"}
# The interpreter pays per program and per op, not per FLOP: few, large programs.
INTERPRETER_BLOCKS = TritonBlocks(block_m=64, block_v=128, block_k=64, v_splits=1, block_n=128)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, softcap,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_V] fp32 tile of (soft-capped) hidden[rows] @ weight[cols].T + bias[cols]."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_row = rows.to(tl.int64)[:, None] * H
    w_row = cols.to(tl.int64)[:, None] * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h = tl.load(h_ptr + h_row + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + w_row + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        # softcap * tanh(acc / softcap); 1 - 2 / (exp(2u) + 1) saturates cleanly at +-1.
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, max_ptr, sum_ptr, idx_ptr, tgt_ptr,
                N, V, H, v_per_split, softcap,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Per (token block, vocabulary slice): running max, sum of exp, argmax and label logit -> [S, N]."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    arg = tl.zeros((BLOCK_M,), dtype=tl.int32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, softcap,
                        BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        # Strictly greater: on ties the earlier column wins, as torch.argmax does.
        arg = tl.where(tile_max > run_max, v0 + tl.argmax(z, axis=1), arg)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    out = pid_s * N + rows
    tl.store(max_ptr + out, run_max, mask=row_mask)
    tl.store(sum_ptr + out, run_sum, mask=row_mask)
    tl.store(idx_ptr + out, arg, mask=row_mask)
    tl.store(tgt_ptr + out, target, mask=row_mask)


@triton.jit
def _combine_kernel(max_ptr, sum_ptr, idx_ptr, tgt_ptr, y_ptr, tid_ptr, loss_ptr, lse_ptr,
                    ce_part_ptr, z_part_ptr, tok_part_ptr, hit_part_ptr,
                    N, S, ignore_index, z_loss,
                    BLOCK_N: tl.constexpr, T_PAD: tl.constexpr):
    """Merge the S vocabulary slices per token; per-task sums of this token block -> [blocks, T_PAD]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    run_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
    run_sum = tl.load(sum_ptr + rows, mask=row_mask, other=1.0)
    arg = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    target = tl.load(tgt_ptr + rows, mask=row_mask, other=0.0)
    for s in range(1, S):
        m = tl.load(max_ptr + s * N + rows, mask=row_mask, other=0.0)
        arg = tl.where(m > run_max, tl.load(idx_ptr + s * N + rows, mask=row_mask, other=0), arg)
        new_max = tl.maximum(run_max, m)
        run_sum = (run_sum * tl.exp(run_max - new_max)
                   + tl.load(sum_ptr + s * N + rows, mask=row_mask, other=1.0) * tl.exp(m - new_max))
        run_max = new_max
        target += tl.load(tgt_ptr + s * N + rows, mask=row_mask, other=0.0)
    lse = run_max + tl.log(run_sum)
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    ce = tl.where(valid, lse - target, 0.0)
    zl = tl.where(valid, z_loss * lse * lse, 0.0)
    tl.store(loss_ptr + rows, ce + zl, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    # Ignored tokens may carry any task id: the one-hot mask drops them.
    tid = tl.load(tid_ptr + rows, mask=row_mask, other=0)
    tasks = tl.arange(0, T_PAD)
    onehot = valid[:, None] & (tid[:, None] == tasks[None, :])
    hit = valid & (arg == y)
    part = pid * T_PAD + tasks
    tl.store(ce_part_ptr + part, tl.sum(tl.where(onehot, ce[:, None], 0.0), axis=0))
    tl.store(z_part_ptr + part, tl.sum(tl.where(onehot, zl[:, None], 0.0), axis=0))
    tl.store(tok_part_ptr + part, tl.sum(onehot.to(tl.int32), axis=0))
    tl.store(hit_part_ptr + part, tl.sum((onehot & hit[:, None]).to(tl.int32), axis=0))


@triton.jit
def _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask,
                  H, ignore_index, softcap, z_loss,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_V] fp32 dloss/dlogits = g * (softmax * (1 + 2 z_loss lse) - onehot) * softcap'."""
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, softcap,
                    BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION)
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = p * (g * (1.0 + 2.0 * z_loss * lse))[:, None] - tl.where(cols[None, :] == y[:, None], g[:, None], 0.0)
    if HAS_SOFTCAP:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    # where, not a product: an inf/NaN upstream gradient (or overflow in a masked row) must not leak.
    return tl.where(valid[:, None] & col_mask[None, :], dz, 0.0)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
                N, V, H, ignore_index, softcap, z_loss,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr,
                NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr):
    """Fused backward: one dlogits tile; atomically add its dH, dW and dbias contributions (fp32)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    dz = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask,
                       H, ignore_index, softcap, z_loss,
                       BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
    if not UPCAST:
        dz = dz.to(h_ptr.dtype.element_ty)  # 16-bit operands for the tensor cores; fp32 accumulation
    h_row = rows.to(tl.int64)[:, None] * H
    w_row = cols.to(tl.int64)[:, None] * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        if NEED_DH:
            w = tl.load(w_ptr + w_row + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dz, w, input_precision=DOT_PRECISION)
            tl.atomic_add(dh_ptr + h_row + ks[None, :], dh, mask=row_mask[:, None] & k_mask[None, :])
        if NEED_DW:
            h = tl.load(h_ptr + h_row + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz), h, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_ptr + w_row + ks[None, :], dw, mask=col_mask[:, None] & k_mask[None, :])


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr, db_ptr,
                    row_start, N, V, H, ignore_index, softcap, z_loss,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, NEED_DB: tl.constexpr):
    """GEMM backward, step 1: the dlogits of tokens [row_start, N) -> dz [chunk, V] (cuBLAS does the rest)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row_start + local
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    dz = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask,
                       H, ignore_index, softcap, z_loss,
                       BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
    out = local.to(tl.int64)[:, None] * V + cols[None, :]
    tl.store(dz_ptr + out, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def is_interpreting() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return isinstance(_fwd_kernel, InterpretedFunction)


def _launch_options(hidden: torch.Tensor, blocks: TritonBlocks | None):
    interp = is_interpreting()
    if hidden.device.type != "cuda" and not interp:
        raise RuntimeError(
            f'impl="triton" needs CUDA tensors (got {hidden.device}); on a CPU it runs only under the Triton '
            'interpreter, with TRITON_INTERPRET=1 set before msft_fast.kernels first runs it. Use impl="torch" '
            'or impl="auto" for CPU tensors.'
        )
    blocks = blocks or (INTERPRETER_BLOCKS if interp else GPU_BLOCKS[hidden.dtype])
    if blocks.backward not in ("fused", "gemm"):
        raise ValueError(f'TritonBlocks.backward must be "fused" or "gemm", got {blocks.backward!r}.')
    precision = DOT_PRECISION[hidden.dtype]
    # The interpreter mishandles bf16 arithmetic: upcast tiles at load there.
    return blocks, interp, precision


def _num_splits(n: int, vocab: int, blocks: TritonBlocks, device: torch.device) -> tuple[int, int]:
    """(S, columns per split): enough (token block, slice) programs for about two waves of SMs."""
    v_tiles = triton.cdiv(vocab, blocks.block_v)
    if blocks.v_splits is not None:
        splits = blocks.v_splits
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        splits = triton.cdiv(2 * sms, max(1, triton.cdiv(n, blocks.block_m)))
    tiles_per_split = triton.cdiv(v_tiles, max(1, min(splits, v_tiles)))
    return triton.cdiv(v_tiles, tiles_per_split), tiles_per_split * blocks.block_v


class TritonLinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses [N] float32 (cross-entropy + z-loss), TaskStats and per-task z-loss [T]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, task_ids, num_tasks, ignore_index, softcap, z_loss, blocks):
        blocks, interp, precision = _launch_options(hidden, blocks)
        n, h_dim = hidden.shape
        vocab, dev = weight.shape[0], hidden.device
        splits, v_per_split = _num_splits(n, vocab, blocks, dev)
        f32 = dict(dtype=torch.float32, device=dev)
        run_max, run_sum, target = (torch.empty(splits, n, **f32) for _ in range(3))
        arg = torch.empty(splits, n, dtype=torch.int32, device=dev)
        loss, lse = torch.empty(n, **f32), torch.empty(n, **f32)
        t_pad = max(16, triton.next_power_of_2(num_tasks))  # one-hot width; >= 16 keeps tiles GPU-friendly
        block_n = max(16, min(blocks.block_n, triton.next_power_of_2(max(1, 8192 // t_pad))))
        n_blocks = triton.cdiv(n, block_n)
        ce_part, z_part = torch.zeros(n_blocks, t_pad, **f32), torch.zeros(n_blocks, t_pad, **f32)
        tok_part, hit_part = (torch.zeros(n_blocks, t_pad, dtype=torch.int32, device=dev) for _ in range(2))
        has_bias = bias is not None
        cap = 1.0 if softcap is None else float(softcap)
        if n > 0:
            _fwd_kernel[(triton.cdiv(n, blocks.block_m), splits)](
                hidden, weight, bias if has_bias else weight, labels, run_max, run_sum, arg, target,
                n, vocab, h_dim, v_per_split, cap,
                BLOCK_M=blocks.block_m, BLOCK_V=blocks.block_v, BLOCK_K=blocks.block_k,
                HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None, UPCAST=interp, DOT_PRECISION=precision,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages,
            )
            _combine_kernel[(n_blocks,)](
                run_max, run_sum, arg, target, labels, task_ids, loss, lse,
                ce_part, z_part, tok_part, hit_part,
                n, splits, ignore_index, float(z_loss),
                BLOCK_N=block_n, T_PAD=t_pad, num_warps=4,
            )
        stats = TaskStats(
            ce_part.sum(0)[:num_tasks],
            tok_part.sum(0, dtype=torch.int64)[:num_tasks],
            hit_part.sum(0, dtype=torch.int64)[:num_tasks],
        )
        z_sum = z_part.sum(0)[:num_tasks]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (ignore_index, softcap, float(z_loss), blocks, interp, precision)
        ctx.mark_non_differentiable(*stats, z_sum)
        return (loss, *stats, z_sum)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, softcap, z_loss, blocks, interp, precision = ctx.options
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        n, h_dim = hidden.shape
        vocab, dev = weight.shape[0], hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        if blocks.backward == "gemm" and n > 0:
            dh, dw, db = _backward_gemm(hidden, weight, bias, labels, lse, grad_loss, (need_dh, need_dw, need_db),
                                        blocks, interp, precision, (ignore_index, softcap, z_loss))
            grads = [None if g is None else g.to(t.dtype) for g, t in ((dh, hidden), (dw, weight), (db, bias))]
            return (*grads, None, None, None, None, None, None, None)
        # fp32 accumulators (atomics); for fp32 inputs they are the gradients themselves.
        dh = torch.zeros(n, h_dim, **f32) if need_dh else None
        dw = torch.zeros(vocab, h_dim, **f32) if need_dw else None
        db = torch.zeros(vocab, **f32) if need_db else None
        if n > 0 and (need_dh or need_dw or need_db):
            has_bias = bias is not None
            _bwd_kernel[(triton.cdiv(n, blocks.block_m), triton.cdiv(vocab, blocks.block_v))](
                hidden, weight, bias if has_bias else weight, labels, lse,
                grad_loss.to(torch.float32).contiguous(),
                dh if need_dh else lse, dw if need_dw else lse, db if need_db else lse,
                n, vocab, h_dim, ignore_index, 1.0 if softcap is None else float(softcap), z_loss,
                BLOCK_M=blocks.block_m, BLOCK_V=blocks.block_v, BLOCK_K=blocks.block_k,
                HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None, UPCAST=interp, DOT_PRECISION=precision,
                NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages,
            )
        grads = [None if g is None else g.to(t.dtype) for g, t in ((dh, hidden), (dw, weight), (db, bias))]
        return (*grads, None, None, None, None, None, None, None)


def _backward_gemm(hidden, weight, bias, labels, lse, grad_loss, need, blocks, interp, precision, options):
    """dH, dW (fp32 accumulation) and dbias from dlogits chunks: Triton for dlogits, cuBLAS for the GEMMs."""
    ignore_index, softcap, z_loss = options
    need_dh, need_dw, need_db = need
    n, h_dim = hidden.shape
    vocab, dev = weight.shape[0], hidden.device
    # The interpreter mishandles bf16: fp32 dlogits (and fp32 GEMMs) there.
    dz_dtype = torch.float32 if interp else hidden.dtype
    itemsize = torch.finfo(dz_dtype).bits // 8
    chunk = max(1, blocks.gemm_chunk_bytes // (vocab * itemsize)) // blocks.block_m * blocks.block_m
    chunk = min(max(chunk, blocks.block_m), triton.cdiv(n, blocks.block_m) * blocks.block_m)
    dz = torch.empty(chunk, vocab, dtype=dz_dtype, device=dev)
    w_op = weight.to(dz_dtype)
    dh = torch.empty(n, h_dim, dtype=dz_dtype, device=dev) if need_dh else None
    dw = None
    if need_dw and chunk < n:  # partial dW products of several chunks are summed in fp32
        dw = torch.zeros(vocab, h_dim, dtype=torch.float32, device=dev)
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    g = grad_loss.to(torch.float32).contiguous()
    has_bias = bias is not None
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        _dlogits_kernel[(triton.cdiv(rows, blocks.block_m), triton.cdiv(vocab, blocks.block_v))](
            hidden, weight, bias if has_bias else weight, labels, lse, g, dz, db if need_db else lse,
            start, start + rows, vocab, h_dim, ignore_index, 1.0 if softcap is None else float(softcap), z_loss,
            BLOCK_M=blocks.block_m, BLOCK_V=blocks.block_v, BLOCK_K=blocks.block_k,
            HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None, UPCAST=interp, DOT_PRECISION=precision,
            NEED_DB=need_db, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
        )
        d = dz[:rows]
        if need_dh:
            torch.mm(d, w_op, out=dh[start:start + rows])
        if need_dw:
            h_op = hidden[start:start + rows].to(dz_dtype)
            if dw is None:  # one chunk: one GEMM, accumulated in fp32 inside cuBLAS, rounded once
                dw = d.T @ h_op
            elif dz_dtype == torch.float32:
                dw.addmm_(d.T, h_op)
            else:
                _addmm_fp32_(dw, d.T, h_op)
    return dh, dw, db


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc[fp32] += a @ b for 16-bit a, b: cuBLAS with an fp32 output where torch offers it (CUDA)."""
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):  # older torch: the product is rounded to 16 bits, then summed in fp32
        acc += (a @ b).float()


def linear_cross_entropy_triton(
    hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction,
    bias=None, softcap=None, z_loss=0.0, blocks: TritonBlocks | None = None,
) -> tuple[torch.Tensor, TaskStats, torch.Tensor]:
    """Triton backend; arguments as in fused_linear_cross_entropy, already validated.

    hidden [N, H] and weight [V, H] float16/bfloat16/float32 contiguous, bias [V] or None,
    labels/task_ids int64 [N]. `blocks`: tile sizes (None: defaults for the GPU or the interpreter).
    Returns the float32 loss (scalar, or [N] for reduction="none"), TaskStats and the per-task
    z-loss sum [T] float32.
    """
    # Launch on the tensors' GPU whatever the current device is (autograd runs the backward on
    # a thread already bound to that device).
    on_device = torch.cuda.device(hidden.device) if hidden.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        loss, *stats, z_sum = TritonLinearCrossEntropyFunction.apply(
            hidden, weight, bias, labels, task_ids, num_tasks, ignore_index, softcap, z_loss, blocks
        )
    stats = TaskStats(*stats)
    if reduction != "none":
        loss = loss.sum()
    if reduction == "mean":
        loss = loss / stats.tokens.sum().clamp(min=1)
    return loss, stats, z_sum
