"""Fused linear + cross-entropy with per-task statistics (installed as msft_fast.kernels)."""

from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .reference import TaskStats

__all__ = ["TaskStats", "fused_linear_cross_entropy"]
