"""The trainer's state beside its weights and optimizer: the counters (where training stands and
what it has spent), the lr schedule with the lr the optimizer takes, and the RNG.

A roll-back puts back the position (`capture_position` / `return_to_position`, kept in a snapshot's
`extra`); a checkpoint keeps all of it (`checkpoint_state`, and the RNG per rank).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from msft_fast.data.loader import MixtureLoader


@dataclass
class Counters:
    """Everything the run has spent so far (global over ranks)."""

    step: int = 0  # optimizer steps behind the current weights (rolls back with them)
    steps_trained: int = 0  # optimizer steps ever taken (never rolls back)
    epoch: int = 0  # current epoch of the active mixture
    step_in_epoch: int = 0
    train_flops: int = 0
    kept_train_flops: int = 0  # of those, the steps behind the current weights (rolls back with them)
    eval_flops: int = 0
    trained_tokens: int = 0  # tokens through forward + backward
    loss_tokens: int = 0  # of those, tokens with a label
    eval_tokens: int = 0
    generated_tokens: int = 0  # by exact-match evaluations; their FLOPs and time are in eval_*
    generation_flops: int = 0
    generation_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    bad_steps: int = 0  # steps whose update was skipped: non-finite loss or gradient norm
    bad_in_row: int = 0
    bad_restores: int = 0  # recoveries from the newest checkpoint after max_bad_steps in a row
    checkpoint_seconds: float = 0.0
    lookahead_flops: int = 0  # of train_flops, virtual steps that were undone (DynamixSFT's look-ahead)
    lookahead_tokens: int = 0


def set_schedule(scheduler, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The lr schedule at a position, and the optimizer's lr with it: loading a scheduler's state
    sets what it reports, not the lr the optimizer's groups will use for the next step (that is
    written only by scheduler.step()), so the first step after a roll-back would take the lr of
    the step before it."""
    scheduler.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def rng_state(device: torch.device) -> dict[str, Optional[torch.Tensor]]:
    """This rank's RNG: the CPU generator's, and the GPU's on a CUDA device."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def capture_position(counters: Counters, loader: MixtureLoader, scheduler, device: torch.device) -> dict[str, Any]:
    """What a roll-back returns to besides weights and optimizer state: the counters that roll back
    with the weights, the active tasks, the schedule and the RNG (a snapshot's `extra`)."""
    c = counters
    return {
        "position": (c.step, c.epoch, c.step_in_epoch, c.kept_train_flops),
        "active": loader.active,
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        **rng_state(device),
    }


def return_to_position(position: dict[str, Any], counters: Counters, loader: MixtureLoader, scheduler,
                       optimizer: torch.optim.Optimizer, device: torch.device, with_rng: bool) -> None:
    """Back to a `capture_position`, in place. What was spent (FLOPs, tokens, seconds) is not rolled back."""
    c = counters
    c.step, c.epoch, c.step_in_epoch, c.kept_train_flops = position["position"]
    loader.set_active(position["active"])
    set_schedule(scheduler, optimizer, position["scheduler"])
    if with_rng:
        set_rng_state(position, device)


def checkpoint_state(counters: Counters, scheduler, loader: MixtureLoader, tags: dict) -> dict[str, Any]:
    """The state every rank shares, as a checkpoint keeps it (the RNG is per rank: `rng_state`)."""
    return {"counters": dataclasses.asdict(counters), "scheduler": scheduler.state_dict(),
            "active": loader.active, "tags": dict(tags)}


def load_checkpoint_state(state: dict[str, Any], scheduler, optimizer: torch.optim.Optimizer,
                          loader: MixtureLoader) -> tuple[Counters, dict]:
    """Back to a `checkpoint_state`: the schedule (and the optimizer's lr) and the active tasks in
    place; the counters and the tags are returned."""
    set_schedule(scheduler, optimizer, state["scheduler"])
    loader.set_active(state["active"])
    return Counters(**state["counters"]), dict(state["tags"])
