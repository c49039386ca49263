"""AdamW and the learning-rate schedule (linear warm-up, then cosine, linear or constant)."""
from __future__ import annotations

import math

import torch
from torch import nn

from msft_fast.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the parameters' device and dtype (CUDA and,
    since torch 2.4, CPU: one pass over each tensor instead of a dozen foreach ops; the same
    update up to float rounding), else foreach. Weight decay on matrices only: norms and biases
    are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **hyper)
    except RuntimeError:  # torch checks devices and dtypes up front: no fused kernel for these parameters
        return torch.optim.AdamW(groups, foreach=True, **hyper)


def lr_multiplier(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for the optimizer step with index `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
