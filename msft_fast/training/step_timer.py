"""Time the phases of an optimizer step without making the host wait for the device.

On a GPU the host runs ahead of the device, so host clocks around a phase measure when its work
was queued, not when it ran. CUDA events recorded in the compute stream time the device itself;
they are read once they have passed, which the step loop checks at its next sync point (the step's
one reduction, an evaluation, a checkpoint), so timing never adds a sync. On a CPU the same calls
read the host clock, and the step loop runs the same code.
"""
from __future__ import annotations

import time
import torch


class PhaseTimer:
    """Marks at the ends of a step's phases; `seconds()` gives each phase's duration.

    Usage: `t = PhaseTimer.start(device)`, then `t.mark("data")`, `t.mark("fwd_bwd")`, ...;
    later, once `t.ready()` (or after `t.wait()`), `t.seconds()` -> {"data": s, "fwd_bwd": s, ...}.
    """

    def __init__(self):
        self.names: list[str] = []

    @staticmethod
    def start(device: torch.device) -> "PhaseTimer":
        timer = CudaEventTimer() if device.type == "cuda" else HostTimer()
        timer._record()
        return timer

    def mark(self, phase: str) -> None:
        """The phase `phase` ends here (and the next one starts)."""
        self.names.append(phase)
        self._record()

    def ready(self) -> bool:
        """True once every mark has passed on the device (never blocks)."""
        raise NotImplementedError

    def wait(self) -> None:
        """Block until every mark has passed."""
        raise NotImplementedError

    def seconds(self) -> dict[str, float]:
        """Duration of each phase, in marking order; call once ready."""
        raise NotImplementedError

    def _record(self) -> None:
        raise NotImplementedError


class HostTimer(PhaseTimer):
    """Host clock: on a CPU the host does the work, so every mark has passed when it is made."""

    def __init__(self):
        super().__init__()
        self.stamps: list[float] = []

    def _record(self) -> None:
        self.stamps.append(time.perf_counter())

    def ready(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def seconds(self) -> dict[str, float]:
        return {name: b - a for name, a, b in zip(self.names, self.stamps, self.stamps[1:])}


class CudaEventTimer(PhaseTimer):
    """CUDA events in the current stream: a phase's time is the device's, from the previous mark
    passing to this one passing (a phase the device waits for, e.g. data the host is still
    preparing, counts as that phase's time)."""

    def __init__(self):
        super().__init__()
        self.events: list[torch.cuda.Event] = []

    def _record(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)

    def ready(self) -> bool:
        return self.events[-1].query()

    def wait(self) -> None:
        self.events[-1].synchronize()

    def seconds(self) -> dict[str, float]:
        return {name: a.elapsed_time(b) / 1e3 for name, a, b in zip(self.names, self.events, self.events[1:])}

