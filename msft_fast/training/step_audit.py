"""What a training step does besides computing: host-device synchronisations and gradient reductions.
The GPU check (bench/bench_train.py --check) and the tests use these to hold the step loop to its design.

HostSyncAudit: a training step should make the host wait for the GPU once (msft_fast/training/trainer.py);
every other wait stalls the launch queue. On CUDA this uses PyTorch's sync debug mode, which reports every
synchronising call (an `.item()`, a blocking copy to the host, `nonzero`, ...) as a warning; each is
caught here with its Python call stack. On a CPU nothing synchronises, so the same audit counts the
Python calls that would synchronise on a GPU: `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, and
`float`/`int`/`bool`/`index` of a tensor (syncs made inside C++ code are not seen there).

    with HostSyncAudit(device) as audit:
        trainer.train_step()
    audit.events  # [SyncEvent(what, where, stack)]

GradientReductions: FSDP2's gradient reductions, counted per FSDP unit (one call of its reduction
per unit that reduces) and per collective inside it (reduce-scatters; all-reduces across HSDP
replicas). With train.grad_sync=step every unit reduces once per optimizer step.
"""
from __future__ import annotations

import os
import traceback
import warnings
from dataclasses import dataclass

import torch

# Python-level calls that read a tensor's value on the host: each one waits for the device on a GPU.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
_HERE = os.path.abspath(__file__)


@dataclass(frozen=True)
class SyncEvent:
    what: str  # the call ("item", "__bool__", ...) or the CUDA warning's text
    where: str  # "path:line" of the innermost Python frame that made it
    stack: tuple[str, ...]  # "path:line in function", outermost first

    def in_files(self, *parts: str) -> bool:
        """Made by a frame whose path contains one of `parts` (e.g. "msft_fast/training/trainer.py")."""
        return any(p in self.where.replace(os.sep, "/") for p in parts)

    def came_through(self, *parts: str) -> bool:
        """Some frame of its stack is in a file whose path contains one of `parts`."""
        return any(p in frame.replace(os.sep, "/") for frame in self.stack for p in parts)


class HostSyncAudit:
    """Context manager recording SyncEvents (see the module docstring); not thread-safe."""

    def __init__(self, device: torch.device):
        self.device = device
        self.events: list[SyncEvent] = []
        self._undo = []

    def __enter__(self) -> "HostSyncAudit":
        if self.device.type == "cuda":
            self._watch_cuda()
        else:
            self._watch_python_reads()
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def by_site(self) -> dict[str, int]:
        """How many events each call site made, most first."""
        counts: dict[str, int] = {}
        for e in self.events:
            counts[e.where] = counts.get(e.where, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if os.path.abspath(f.filename) != _HERE
                  and "/warnings.py" not in f.filename]
        stack = tuple(f"{f.filename}:{f.lineno} in {f.name}" for f in frames)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        self.events.append(SyncEvent(what, where, stack))

    def _watch_cuda(self) -> None:
        catcher = warnings.catch_warnings()
        catcher.__enter__()
        warnings.simplefilter("always")
        previous_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if "synchroniz" in text:  # "called a synchronizing CUDA operation"
                self._record(text.splitlines()[0][:120])  # called inside warn(): the stack is the caller's
            else:
                previous_show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        previous_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")

        def undo():
            torch.cuda.set_sync_debug_mode(previous_mode)
            catcher.__exit__(None, None, None)  # restores warnings.showwarning and the filters

        self._undo.append(undo)

    def _watch_python_reads(self) -> None:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def read(tensor, *args, _name=name, _original=original, **kwargs):
                self._record(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, read)
            self._undo.append(lambda name=name, original=original: setattr(torch.Tensor, name, original))


class GradientReductions:
    """Context manager counting FSDP2's gradient reductions (see the module docstring)."""

    def __init__(self):
        self.units = 0  # FSDP units that reduced their gradients
        self.reduce_scatters = 0  # reduce-scatter collectives (none within a one-rank shard group)
        self.all_reduces = 0  # all-reduce collectives across HSDP replicas
        self._inside = False
        self._undo = []

    def __enter__(self) -> "GradientReductions":
        import torch.distributed as dist
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        self._patch(_fsdp_param_group, "foreach_reduce", "units", outer=True)
        for name in ("reduce_scatter_single", "reduce_scatter_tensor"):  # whichever this torch's FSDP2 calls
            if hasattr(dist, name):
                self._patch(dist, name, "reduce_scatters")
        self._patch(dist, "all_reduce", "all_reduces")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def _patch(self, owner, name: str, counter: str, outer: bool = False) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if outer:
                setattr(self, counter, getattr(self, counter) + 1)
                self._inside = True
                try:
                    return original(*args, **kwargs)
                finally:
                    self._inside = False
            if self._inside:  # a collective of a gradient reduction, not one of the trainer's own
                setattr(self, counter, getattr(self, counter) + 1)
            return original(*args, **kwargs)

        setattr(owner, name, counted)
        self._undo.append((owner, name, original))

    def snapshot(self) -> tuple[int, int, int]:
        return self.units, self.reduce_scatters, self.all_reduces
