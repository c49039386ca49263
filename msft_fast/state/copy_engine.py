"""How the snapshot pool moves tensors between the training device and host memory.

The pool (msft_fast/state/snapshot.py) only says what to copy and when the copies must be finished;
an engine does the copying. `SyncCopyEngine` copies at once (CPU tensors: there is nothing to
overlap with). `CudaCopyEngine` copies device tensors into pinned host buffers on a side stream,
so a capture overlaps the next training step; the compute stream waits for the copies only where
it is about to overwrite what they read (the optimizer step), and the host waits only where it
reads the buffers itself (spilling, checkpointing) or restores from them.

The contract, which tests check with an engine that copies as late as it may:
- `to_host(pairs)` may return before the copies are done; the sources must not be written until
  `before_write()` has been called, and the host buffers must not be read until `wait()`.
- `to_device(pairs)` returns once the copies are done (a restore is rare; its time is measured).
"""
from __future__ import annotations

from typing import Iterable

import torch

Pairs = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (destination, source)


class CopyEngine:
    pinned = False  # host buffers in page-locked memory

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised host tensor of `like`'s shape and dtype, reused across captures."""
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self.pinned)

    def to_host(self, pairs: Pairs) -> None:
        raise NotImplementedError

    def before_write(self) -> None:
        """Order any later write of the sources after the copies `to_host` started (no host wait)."""

    def wait(self) -> None:
        """Block the host until the copies `to_host` started are done."""

    def to_device(self, pairs: Pairs) -> None:
        raise NotImplementedError


class SyncCopyEngine(CopyEngine):
    """Copies at once, on the calling thread: CPU training, where the device is the host."""

    def to_host(self, pairs: Pairs) -> None:
        with torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src)

    def to_device(self, pairs: Pairs) -> None:
        self.to_host(pairs)


class CudaCopyEngine(CopyEngine):
    """Device-to-host copies on a side stream into pinned buffers, overlapping the compute stream."""

    pinned = True

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._copied = None  # event: the side stream's copies so far are done
        self._ordered = True  # the compute stream already waits for `_copied`

    def to_host(self, pairs: Pairs) -> None:
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # copy the state as the compute stream has it now
        with torch.no_grad(), torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.stream)  # the allocator must not hand `src` out mid-copy
        self._copied = self.stream.record_event()
        self._ordered = False

    def before_write(self) -> None:
        if not self._ordered:
            torch.cuda.current_stream(self.device).wait_event(self._copied)
            self._ordered = True

    def wait(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def to_device(self, pairs: Pairs) -> None:
        self.before_write()  # a capture still reading the live tensors finishes first
        with torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        # The restored state must be in place (and the restore's time real) before training goes on.
        torch.cuda.current_stream(self.device).synchronize()


def copy_engine_for(device: torch.device) -> CopyEngine:
    return CudaCopyEngine(device) if device.type == "cuda" else SyncCopyEngine()
