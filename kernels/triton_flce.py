"""The tiled path (impl="triton"): a Cut-Cross-Entropy-style Triton kernel whose [N, V] logits exist
only as register tiles, recomputed in backward. The default on a GPU is the chunked path
(chunked.py); this one is kept for what it does best (no logits traffic at all, and, with the
optional gradient filter, skipping most of the backward) and as a second, independent
implementation that the tests hold against the first.

Shapes: N tokens, H hidden size, V vocabulary size, T tasks, S vocabulary splits.
Inputs reaching this module are already validated and contiguous (see fused_linear_cross_entropy.py).

  1. `_fwd_kernel`, one program per (token block, vocabulary split): per V tile it forms the logit
     tile with `tl.dot` over H (fp32 accumulation), adds the bias, soft-caps, and folds the tile
     into an online log-sum-exp, a running argmax and the label's logit; O(S x N) partials.
  2. `_combine_kernel`: merges the S partials per token into lse, cross-entropy and argmax hit;
     task_stats.py turns those into the per-task sums (no atomics, a fixed order).
  3. backward="fused" (`_bwd_kernel`), one program per (token block, V tile): recomputes the tile
     from hidden, weight and the saved lse, forms dlogits in registers and adds dH += dlogits @ W
     and dW += dlogits.T @ hidden (and dbias) into fp32 buffers with relaxed atomics. 8NHV FLOPs.
     backward="gemm" (`_dlogits_kernel`): the same recompute writes a token chunk's dlogits
     [C, V] in the input dtype and cuBLAS forms dH and dW from it: no atomics but dbias, an HBM
     round trip of the chunk and its buffer (`gemm_chunk_bytes`).

What was repaired after reading the sm_90 code (no GPU has timed any of it yet; bench/roofline.py
models it and bench/bench_loss.py --device cuda measures it):
  - program order: both grids are 1-D and grouped (`_grouped`): GROUP_M token blocks walk the
    vocabulary together, so the programs resident at once share their hidden rows and weight
    tiles in L2. Before, every token block met one vocabulary tile before the next, and the
    hidden states (128 MiB at 16384 x 4096, more than the L2) came from HBM once per tile.
  - atomics: `sem="relaxed"`. The adds are commutative and read only after the kernel ends, so
    they need no ordering; the default (acq_rel) wrapped each one in GPU-scope memory barriers
    (MEMBAR.ALL.GPU in SASS). The compile test fails if an acq_rel atomic or a GPU-scope fence
    comes back. The atomic payload itself stays, 4 N V H (1/BLOCK_M + 1/BLOCK_V) bytes: 540 GB
    at 16384 x 4096 x 128256 with 128 x 128 tiles, hence the chunked default.
  - gradient filter (`filter_eps`, off by default so gradients stay exact): CCE's observation that
    most softmax entries of a trained model are below what a 16-bit gradient can hold; a tile
    whose every |dlogit| is below filter_eps skips its two matmuls and all its atomics.
  - tiles: `triton.autotune` over a few Hopper configurations (FWD_CONFIGS, BWD_CONFIGS,
    DLOGITS_CONFIGS) keyed on (H, V, the dtypes), with `reset_to_zero` for the atomic buffers;
    each one compiles for sm_90 without spills (tests/test_loss_triton.py,
    bench/results/kernels_sm90.md). fp32 inputs use one fixed configuration (3xTF32 dots).
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

from .fp32_gemm import addmm_fp32_
from .reference import TaskStats
from .softcap import softcap_tanh
from .task_stats import per_task_sums


@dataclass(frozen=True)
class TritonBlocks:
    """Fixed tile sizes and launch options (each block >= 16, powers of two); None in the entry point
    means autotuned on a GPU."""

    block_m: int = 128  # tokens per program (forward and backward)
    block_v: int = 128  # vocabulary columns per tile
    block_k: int = 64  # hidden columns per dot step
    group_m: int = 8  # token blocks that walk the vocabulary together (L2 reuse)
    v_splits: int | None = None  # vocabulary slices of the forward grid; None: see _num_splits
    block_n: int = 128  # tokens per program of the combine kernel
    num_warps: int = 8
    num_stages: int = 3
    # "fused": one kernel, dH/dW accumulated with relaxed fp32 atomics (3 matmuls, run-to-run bit noise).
    # "gemm": Triton writes a token chunk's dlogits [C, V] in the input dtype, cuBLAS forms dH and
    # dW from it (deterministic but for dbias; costs the chunk buffer and its HBM round trip).
    backward: str = "fused"
    gemm_chunk_bytes: int = 1 << 30  # dlogits buffer of the "gemm" backward


def _config(block_m, block_v, block_k, group_m, num_warps, num_stages) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps,
                num_stages=num_stages)


# Hopper configurations for 16-bit inputs, autotuned per (H, V, dtypes). The first of each list is
# GPU_BLOCKS' (the fixed default). All compile for sm_90 without spills within 227 KiB of shared
# memory (checked by tests/test_loss_triton.py). None was timed on a GPU yet.
FWD_CONFIGS = (_config(128, 128, 64, 8, 8, 3), _config(128, 128, 64, 16, 8, 4), _config(64, 256, 64, 16, 8, 4))
BWD_CONFIGS = (_config(128, 128, 64, 8, 8, 3), _config(64, 128, 64, 16, 8, 3), _config(128, 64, 64, 8, 4, 3))
DLOGITS_CONFIGS = (_config(128, 128, 64, 8, 8, 3), _config(64, 256, 64, 16, 8, 4))

# Fixed blocks per input dtype: the first configuration above for 16-bit inputs; fp32 (3xTF32 dots)
# spills at 128x128 tiles, hence smaller ones. Used when autotuning is off (blocks given) and for fp32.
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
FWD_MIN_SPLITS = 64  # with GROUP_M = 8: a group's splits outnumber the ~132 programs resident at once


@triton.jit
def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of 1-D program `pid` in grouped order: GROUP_M consecutive row blocks sweep the
    n axis side by side, so programs launched together share those row blocks (and their n tiles)."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(num_m - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % rows_here, local // rows_here


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
        acc = softcap_tanh(acc, softcap)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, max_ptr, sum_ptr, idx_ptr, tgt_ptr,
                N, V, H, S, softcap,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Per (token block, vocabulary split): running max, sum of exp, argmax and label logit -> [S, N].

    A split past the last tile (S larger than the tiles of this BLOCK_V) writes an empty partial
    (max -inf, sum 0) that the combine step ignores.
    """
    pid_m, pid_s = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_M), S, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), S)
    v_start = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
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
def _combine_kernel(max_ptr, sum_ptr, idx_ptr, tgt_ptr, y_ptr, lse_ptr, ce_ptr, hit_ptr,
                    N, S, ignore_index, BLOCK_N: tl.constexpr):
    """Merge the S vocabulary splits per token -> lse (every token), ce and hit (0 for ignored ones)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    run_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
    run_sum = tl.load(sum_ptr + rows, mask=row_mask, other=1.0)
    arg = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    target = tl.load(tgt_ptr + rows, mask=row_mask, other=0.0)
    for s in range(1, S):
        m = tl.load(max_ptr + s * N + rows, mask=row_mask, other=float("-inf"))
        arg = tl.where(m > run_max, tl.load(idx_ptr + s * N + rows, mask=row_mask, other=0), arg)
        new_max = tl.maximum(run_max, m)
        # An empty split (m = -inf, sum 0) adds 0 * 0; split 0 is never empty.
        run_sum = (run_sum * tl.exp(run_max - new_max)
                   + tl.load(sum_ptr + s * N + rows, mask=row_mask, other=0.0) * tl.exp(m - new_max))
        run_max = new_max
        target += tl.load(tgt_ptr + s * N + rows, mask=row_mask, other=0.0)
    lse = run_max + tl.log(run_sum)
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(ce_ptr + rows, tl.where(valid, lse - target, 0.0), mask=row_mask)
    tl.store(hit_ptr + rows, (valid & (arg == y)).to(tl.int32), mask=row_mask)


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
    dz = tl.exp(z - lse[:, None]) * (g * (1.0 + 2.0 * z_loss * lse))[:, None] - tl.where(
        cols[None, :] == y[:, None], g[:, None], 0.0)
    if HAS_SOFTCAP:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    # where, not a product: an inf/NaN incoming gradient (or overflow in a masked row) must not leak.
    return tl.where(valid[:, None] & col_mask[None, :], dz, 0.0), tl.where(valid, g, 0.0)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
                N, V, H, ignore_index, softcap, z_loss, filter_eps,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, HAS_FILTER: tl.constexpr,
                NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr):
    """Fused backward: one dlogits tile; relaxed fp32 atomic adds of its dH, dW and dbias parts."""
    pid_m, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    dz, g = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask,
                          H, ignore_index, softcap, z_loss,
                          BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION)
    keep = True
    if HAS_FILTER:
        # Skip the tile (its two matmuls and all its atomics) when every |dloss/dlogit| in it is below
        # filter_eps, measured against the largest incoming gradient of its tokens (for a summed
        # loss all of them are equal, so this is the gradient before the incoming one).
        keep = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps * tl.max(tl.abs(g), axis=0)
    if keep:
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
        dz_op = dz
        if not UPCAST:
            dz_op = dz.to(h_ptr.dtype.element_ty)  # 16-bit operands for the tensor cores; fp32 accumulation
        h_row = rows.to(tl.int64)[:, None] * H
        w_row = cols.to(tl.int64)[:, None] * H
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            if NEED_DH:
                w = tl.load(w_ptr + w_row + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_ptr + h_row + ks[None, :], dh, mask=row_mask[:, None] & k_mask[None, :],
                              sem="relaxed")
            if NEED_DW:
                h = tl.load(h_ptr + h_row + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptr + w_row + ks[None, :], dw, mask=col_mask[:, None] & k_mask[None, :],
                              sem="relaxed")


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr, db_ptr,
                    row_start, N, V, H, ignore_index, softcap, z_loss,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, NEED_DB: tl.constexpr):
    """GEMM backward, step 1: the dlogits of tokens [row_start, N) -> dz [chunk, V] (cuBLAS does the rest)."""
    pid_m, pid_v = _grouped(tl.program_id(0), tl.cdiv(N - row_start, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row_start + local
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    dz, _ = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask,
                          H, ignore_index, softcap, z_loss,
                          BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    out = local.to(tl.int64)[:, None] * V + cols[None, :]
    tl.store(dz_ptr + out, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def is_interpreting() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return isinstance(_fwd_kernel, InterpretedFunction)


_TUNED: dict[str, object] = {}


def _tuned(name: str):
    """The autotuned wrapper of a kernel (built on first use, on a GPU only)."""
    if name not in _TUNED:
        kernel, configs, key, reset = {
            "fwd": (_fwd_kernel, FWD_CONFIGS, ["H", "V", "HAS_SOFTCAP"], None),
            "bwd": (_bwd_kernel, BWD_CONFIGS, ["H", "V", "NEED_DH", "NEED_DW", "HAS_FILTER"],
                    ["dh_ptr", "dw_ptr", "db_ptr"]),
            "dlogits": (_dlogits_kernel, DLOGITS_CONFIGS, ["H", "V"], ["db_ptr"]),
        }[name]
        tconfigs = [triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"],
                                  num_stages=c["num_stages"]) for c in configs]
        # reset_to_zero: the timing runs of the atomic kernels must not leave their sums behind.
        _TUNED[name] = triton.autotune(tconfigs, key=key, reset_to_zero=reset)(kernel)
    return _TUNED[name]


@dataclass(frozen=True)
class _Launch:
    """How one call launches its kernels: fixed blocks, or autotuned configurations on a GPU."""

    blocks: TritonBlocks  # fixed sizes; for autotuned launches only block_n, v_splits and the backward
    tuned: bool
    interp: bool
    precision: str

    def kernel(self, name: str, fixed):
        """(kernel, extra kwargs): the autotuned wrapper, or the plain kernel with the fixed blocks."""
        if self.tuned:
            return _tuned(name), {}
        b = self.blocks
        return fixed, dict(BLOCK_M=b.block_m, BLOCK_V=b.block_v, BLOCK_K=b.block_k, GROUP_M=b.group_m,
                           num_warps=b.num_warps, num_stages=b.num_stages)


def _launch_options(hidden: torch.Tensor, blocks: TritonBlocks | None, backward: str | None = None) -> _Launch:
    interp = is_interpreting()
    if hidden.device.type != "cuda" and not interp:
        raise RuntimeError(
            f'impl="triton" needs CUDA tensors (got {hidden.device}); on a CPU it runs only under the Triton '
            'interpreter, with TRITON_INTERPRET=1 set before msft_fast.kernels first runs it. Use impl="torch" '
            'or impl="auto" for CPU tensors.'
        )
    tuned = blocks is None and not interp and hidden.dtype != torch.float32
    blocks = blocks or (INTERPRETER_BLOCKS if interp else GPU_BLOCKS[hidden.dtype])
    if blocks.backward not in ("fused", "gemm"):
        raise ValueError(f'TritonBlocks.backward must be "fused" or "gemm", got {blocks.backward!r}.')
    # The interpreter mishandles bf16 arithmetic: tiles are upcast at load there (UPCAST).
    return _Launch(blocks, tuned, interp, DOT_PRECISION[hidden.dtype])


def _num_splits(n: int, vocab: int, blocks: TritonBlocks, device: torch.device) -> int:
    """S: vocabulary splits of the forward grid. Enough (token block, split) programs for two waves of
    SMs and, with the grouped order, at least FWD_MIN_SPLITS, capped by the tiles of the smallest BLOCK_V."""
    v_tiles = triton.cdiv(vocab, 128 if blocks.v_splits is None else blocks.block_v)
    if blocks.v_splits is not None:
        return max(1, min(blocks.v_splits, triton.cdiv(vocab, blocks.block_v)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(v_tiles, max(FWD_MIN_SPLITS, triton.cdiv(2 * sms, max(1, triton.cdiv(n, blocks.block_m))))))


def _scratch(device) -> torch.Tensor:
    """A one-element fp32 buffer for a pointer argument a launch does not use (never aliasing real data:
    autotuning zeroes the atomic buffers it is given)."""
    return torch.zeros(1, dtype=torch.float32, device=device)


class TritonLinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses [N] float32 (cross-entropy + z-loss), TaskStats and per-task z-loss [T]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, task_ids, num_tasks, ignore_index, softcap, z_loss, launch,
                filter_eps):
        blocks = launch.blocks
        n, h_dim = hidden.shape
        vocab, dev = weight.shape[0], hidden.device
        splits = _num_splits(n, vocab, blocks, dev)
        f32 = dict(dtype=torch.float32, device=dev)
        run_max, run_sum, target = (torch.empty(splits, n, **f32) for _ in range(3))
        arg = torch.empty(splits, n, dtype=torch.int32, device=dev)
        lse, ce = torch.empty(n, **f32), torch.empty(n, **f32)
        hit = torch.empty(n, dtype=torch.int32, device=dev)
        has_bias = bias is not None
        cap = 1.0 if softcap is None else float(softcap)
        if n > 0:
            kernel, extra = launch.kernel("fwd", _fwd_kernel)
            kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * splits,)](
                hidden, weight, bias if has_bias else _scratch(dev), labels, run_max, run_sum, arg, target,
                n, vocab, h_dim, splits, cap,
                HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None, UPCAST=launch.interp,
                DOT_PRECISION=launch.precision, **extra,
            )
            _combine_kernel[(triton.cdiv(n, blocks.block_n),)](
                run_max, run_sum, arg, target, labels, lse, ce, hit, n, splits, ignore_index,
                BLOCK_N=blocks.block_n, num_warps=4,
            )
        stats, z_sum = per_task_sums(ce, lse, hit, labels, task_ids, num_tasks, ignore_index, z_loss)
        loss = torch.where(labels != ignore_index, ce + z_loss * lse * lse, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (ignore_index, softcap, float(z_loss), launch, filter_eps)
        ctx.mark_non_differentiable(*stats, z_sum)
        return (loss, *stats, z_sum)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, softcap, z_loss, launch, filter_eps = ctx.options
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        n, h_dim = hidden.shape
        vocab, dev = weight.shape[0], hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        cap = 1.0 if softcap is None else float(softcap)
        if launch.blocks.backward == "gemm" and n > 0:
            dh, dw, db = _backward_gemm(hidden, weight, bias, labels, lse, grad_loss, (need_dh, need_dw, need_db),
                                        launch, (ignore_index, softcap, z_loss))
            grads = [None if g is None else g.to(t.dtype) for g, t in ((dh, hidden), (dw, weight), (db, bias))]
            return (*grads, None, None, None, None, None, None, None, None)
        # fp32 accumulators (atomics); for fp32 inputs they are the gradients themselves.
        dh = torch.zeros(n, h_dim, **f32) if need_dh else None
        dw = torch.zeros(vocab, h_dim, **f32) if need_dw else None
        db = torch.zeros(vocab, **f32) if need_db else None
        if n > 0 and (need_dh or need_dw or need_db):
            has_bias = bias is not None
            kernel, extra = launch.kernel("bwd", _bwd_kernel)
            kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)](
                hidden, weight, bias if has_bias else _scratch(dev), labels, lse,
                grad_loss.to(torch.float32).contiguous(),
                dh if need_dh else _scratch(dev), dw if need_dw else _scratch(dev), db if need_db else _scratch(dev),
                n, vocab, h_dim, ignore_index, cap, z_loss, 0.0 if filter_eps is None else float(filter_eps),
                HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None, UPCAST=launch.interp,
                DOT_PRECISION=launch.precision, HAS_FILTER=filter_eps is not None,
                NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, **extra,
            )
        grads = [None if g is None else g.to(t.dtype) for g, t in ((dh, hidden), (dw, weight), (db, bias))]
        return (*grads, None, None, None, None, None, None, None, None)


def _backward_gemm(hidden, weight, bias, labels, lse, grad_loss, need, launch, options):
    """dH, dW (fp32 accumulation) and dbias from dlogits chunks: Triton for dlogits, cuBLAS for the GEMMs."""
    ignore_index, softcap, z_loss = options
    need_dh, need_dw, need_db = need
    blocks = launch.blocks
    n, h_dim = hidden.shape
    vocab, dev = weight.shape[0], hidden.device
    # The interpreter mishandles bf16: fp32 dlogits (and fp32 GEMMs) there.
    dz_dtype = torch.float32 if launch.interp else hidden.dtype
    itemsize = torch.finfo(dz_dtype).bits // 8
    align = 256 if launch.tuned else blocks.block_m  # chunks of whole token blocks (256: any tuned BLOCK_M)
    chunk = max(align, blocks.gemm_chunk_bytes // (vocab * itemsize) // align * align)
    chunk = min(chunk, triton.cdiv(n, align) * align)
    dz = torch.empty(chunk, vocab, dtype=dz_dtype, device=dev)
    w_op = weight.to(dz_dtype)
    dh = torch.empty(n, h_dim, dtype=dz_dtype, device=dev) if need_dh else None
    dw = None
    if need_dw and chunk < n:  # partial dW products of several chunks are summed in fp32
        dw = torch.zeros(vocab, h_dim, dtype=torch.float32, device=dev)
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else _scratch(dev)
    g = grad_loss.to(torch.float32).contiguous()
    has_bias = bias is not None
    kernel, extra = launch.kernel("dlogits", _dlogits_kernel)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)](
            hidden, weight, bias if has_bias else _scratch(dev), labels, lse, g, dz, db,
            start, start + rows, vocab, h_dim, ignore_index, 1.0 if softcap is None else float(softcap), z_loss,
            HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None, UPCAST=launch.interp, DOT_PRECISION=launch.precision,
            NEED_DB=need_db, **extra,
        )
        d = dz[:rows]
        if need_dh:
            torch.mm(d, w_op, out=dh[start:start + rows])
        if need_dw:
            h_op = hidden[start:start + rows].to(dz_dtype)
            if dw is None:  # one chunk: one GEMM, accumulated in fp32 inside cuBLAS, rounded once
                dw = d.T @ h_op
            else:
                addmm_fp32_(dw, d.T, h_op)
    return dh, dw, db if need_db else None


def linear_cross_entropy_triton(
    hidden, weight, labels, task_ids, num_tasks, ignore_index, reduction,
    bias=None, softcap=None, z_loss=0.0, blocks: TritonBlocks | None = None, filter_eps: float | None = None,
) -> tuple[torch.Tensor, TaskStats, torch.Tensor]:
    """Tiled backend; arguments as in fused_linear_cross_entropy, already validated.

    hidden [N, H] and weight [V, H] float16/bfloat16/float32 contiguous, bias [V] or None,
    labels/task_ids int64 [N]. `blocks`: fixed tile sizes and the backward ("fused" or "gemm");
    None: autotuned on a GPU for 16-bit inputs (GPU_BLOCKS for fp32, INTERPRETER_BLOCKS under the
    interpreter), fused backward. `filter_eps`: the fused backward's tile filter (None: exact).
    Returns the float32 loss (scalar, or [N] for reduction="none"), TaskStats and the per-task
    z-loss sum [T] float32.
    """
    launch = _launch_options(hidden, blocks)
    if filter_eps is not None and launch.blocks.backward != "fused":
        raise ValueError('filter_eps needs the fused backward (TritonBlocks.backward="fused").')
    # Launch on the tensors' GPU whatever the current device is (autograd runs the backward on
    # a thread already bound to that device).
    on_device = torch.cuda.device(hidden.device) if hidden.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        loss, *stats, z_sum = TritonLinearCrossEntropyFunction.apply(
            hidden, weight, bias, labels, task_ids, num_tasks, ignore_index, softcap, z_loss, launch, filter_eps
        )
    stats = TaskStats(*stats)
    if reduction != "none":
        loss = loss.sum()
    if reduction == "mean":
        loss = loss / stats.tokens.sum().clamp(min=1)
    return loss, stats, z_sum
