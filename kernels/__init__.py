"""Fused linear + cross-entropy with per-task statistics (installed as msft_fast.kernels)."""

from .chunk_plan import DEFAULT_CHUNK_BYTES, ChunkPlan, plan_chunks
from .fused_linear_cross_entropy import fused_linear_cross_entropy, loss_memory_bytes
from .reference import TaskStats

__all__ = ["DEFAULT_CHUNK_BYTES", "ChunkPlan", "TaskStats", "fused_linear_cross_entropy", "loss_memory_bytes",
           "plan_chunks"]
