"""A training step's numbers on the host: its reduced sums, read in one device-to-host transfer and
turned into means, and its metrics.jsonl record.

The record is built when the step ends, but its time split comes from device-side marks
(step_timer.py), which pass later on a GPU: records wait in `WaitingStepRecords` and are completed
at the next sync point (the next step's reduction, an evaluation, a checkpoint, the end), so the
step loop never waits for the device to read a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from msft_fast.training.step_timer import PhaseTimer


def read_to_host(*tensors: torch.Tensor) -> list[float]:
    """The values of `tensors` (any shapes) as one flat list of Python floats, in one device-to-host
    transfer: the step loop's only host-device sync."""
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).tolist()


def doc_means(sums_then_tokens: list[float]) -> np.ndarray:
    """[D] mean token loss per document from D loss sums followed by D token counts (NaN without tokens)."""
    v = np.asarray(sums_then_tokens, dtype=np.float64).reshape(2, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(v[1] > 0, v[0] / np.maximum(v[1], 1), np.nan)


def task_means(names: list[str], loss_sums: list[float], token_counts: list[float], correct: list[float]) -> dict:
    """A step's metrics.jsonl `tasks`: mean token loss, token accuracy and tokens of each task it trained."""
    return {name: {"loss": ratio(loss_sums[i], token_counts[i]), "token_acc": ratio(correct[i], token_counts[i]),
                   "tokens": int(token_counts[i])}
            for i, name in enumerate(names) if token_counts[i] > 0}


def ratio(num, den) -> float:
    """num / den for host numbers or tensors already on the host; NaN when den is 0."""
    return float(num) / float(den) if float(den) > 0 else float("nan")


@dataclass
class _WaitingStep:
    """A step's metrics record, waiting for its time marks to pass on the device."""

    record: dict
    timer: PhaseTimer
    flops: int
    host_seconds: float

    def complete(self, world_size: int, peak_flops: Optional[float]) -> dict:
        split = self.timer.seconds()
        dt = max(sum(split.values()), 1e-9)
        r = self.record
        r.update({
            "tokens_per_s": r["tokens"] / dt,
            "tokens_per_s_per_device": r["tokens"] / dt / world_size,
            **({"mfu": self.flops / (dt * peak_flops * world_size)} if peak_flops else {}),
            "step_seconds": dt,
            "host_seconds": self.host_seconds,
            "time": split,
        })
        return r


class WaitingStepRecords:
    """Records in step order; `finished` hands out the oldest ones whose marks have passed."""

    def __init__(self, world_size: int, peak_flops: Optional[float]):
        self.world_size, self.peak_flops = world_size, peak_flops
        self._waiting: list[_WaitingStep] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, record: dict, timer: PhaseTimer, flops: int, host_seconds: float) -> None:
        """A step's record without its times; `flops`: the step's, for its MFU."""
        self._waiting.append(_WaitingStep(record, timer, flops, host_seconds))

    def finished(self, wait: bool = False) -> Iterator[dict]:
        """Complete records, oldest first: those whose marks have passed, or all of them (waiting
        for the device) when `wait`."""
        while self._waiting and (wait or self._waiting[0].timer.ready()):
            done = self._waiting.pop(0)
            done.timer.wait()
            yield done.complete(self.world_size, self.peak_flops)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
