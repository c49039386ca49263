"""Per-task sums of the per-token loss statistics, shared by the chunked and the tiled Triton paths.

Shapes: N tokens, T tasks. The loss kernels write per-token cross-entropy, log-sum-exp and argmax
hit once; this kernel folds them into per-task sums with a one-hot [BLOCK_N, T_TILE] reduction per
program and writes per-program partial rows that torch then sums in a fixed order. No atomics: the
statistics (and the loss derived from them) are the same bits on every run. Any number of tasks:
the grid's second axis walks the tasks in tiles of T_TILE.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import TaskStats


@triton.jit
def _task_sums_kernel(ce_ptr, lse_ptr, hit_ptr, y_ptr, tid_ptr, ce_part_ptr, z_part_ptr, tok_part_ptr,
                      hit_part_ptr, N, ignore_index, z_loss,
                      BLOCK_N: tl.constexpr, T_TILE: tl.constexpr):
    """Program (token block b, task tile t) -> parts[b, t*T_TILE:(t+1)*T_TILE] of ce, z-loss, tokens, hits."""
    pid = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    ce = tl.where(valid, tl.load(ce_ptr + rows, mask=row_mask, other=0.0), 0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    zl = tl.where(valid, z_loss * lse * lse, 0.0)
    hit = valid & (tl.load(hit_ptr + rows, mask=row_mask, other=0) != 0)
    # Ignored tokens may carry any task id (even out of range): the one-hot mask drops them.
    tid = tl.load(tid_ptr + rows, mask=row_mask, other=0)
    tasks = pid_t * T_TILE + tl.arange(0, T_TILE)
    onehot = valid[:, None] & (tid[:, None] == tasks[None, :])
    part = pid * (tl.num_programs(1) * T_TILE) + tasks
    tl.store(ce_part_ptr + part, tl.sum(tl.where(onehot, ce[:, None], 0.0), axis=0))
    tl.store(z_part_ptr + part, tl.sum(tl.where(onehot, zl[:, None], 0.0), axis=0))
    tl.store(tok_part_ptr + part, tl.sum(onehot.to(tl.int32), axis=0))
    tl.store(hit_part_ptr + part, tl.sum((onehot & hit[:, None]).to(tl.int32), axis=0))


def task_tiles(num_tasks: int) -> tuple[int, int]:
    """(T_TILE, BLOCK_N): task columns and tokens per program; a [BLOCK_N, T_TILE] tile stays <= 4096."""
    t_tile = min(256, max(16, triton.next_power_of_2(max(1, num_tasks))))
    return t_tile, max(16, min(128, 4096 // t_tile))


def per_task_sums(ce: torch.Tensor, lse: torch.Tensor, hit: torch.Tensor, labels: torch.Tensor,
                  task_ids: torch.Tensor, num_tasks: int, ignore_index: int,
                  z_loss: float) -> tuple[TaskStats, torch.Tensor]:
    """TaskStats and the per-task z-loss sum [T] float32 from per-token values.

    ce [N] float32 (cross-entropy), lse [N] float32, hit [N] int32 (argmax == label), labels and
    task_ids [N] int64; tokens whose label is ``ignore_index`` count nowhere.
    """
    n, dev = labels.shape[0], labels.device
    t_tile, block_n = task_tiles(num_tasks)
    n_blocks, t_blocks = triton.cdiv(n, block_n), triton.cdiv(num_tasks, t_tile)
    width = t_blocks * t_tile
    ce_part, z_part = (torch.zeros(n_blocks, width, dtype=torch.float32, device=dev) for _ in range(2))
    tok_part, hit_part = (torch.zeros(n_blocks, width, dtype=torch.int32, device=dev) for _ in range(2))
    if n > 0:
        _task_sums_kernel[(n_blocks, t_blocks)](
            ce, lse, hit, labels, task_ids, ce_part, z_part, tok_part, hit_part, n, ignore_index, float(z_loss),
            BLOCK_N=block_n, T_TILE=t_tile, num_warps=4,
        )
    stats = TaskStats(ce_part.sum(0)[:num_tasks], tok_part.sum(0, dtype=torch.int64)[:num_tasks],
                      hit_part.sum(0, dtype=torch.int64)[:num_tasks])
    return stats, z_part.sum(0)[:num_tasks]
