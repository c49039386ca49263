"""Roll-back targets in host memory: each rank copies its own shards, no collective.

A snapshot holds this rank's shards of every parameter and, for a full restore, of the optimizer
state, plus the small state (scheduler, data position, RNG) the trainer hands in. Buffers are
reused: a released snapshot's buffers serve the next capture, so the pool's memory is bounded by
the number of states alive at once, which the method plans before training (`plan_pool`).
The copies go through a copy engine (msft_fast/state/copy_engine.py): on CUDA they run on a side stream
into pinned buffers and overlap the next training step, and `wait()` must be called before anything
writes the parameters or the optimizer state (the optimizer step); on a CPU they are plain copies.
Restoring copies the bytes back, so a restored model is bitwise the one that was captured.

When the host cannot hold every state the method may need (`plan_pool`), the pool keeps the newest
`in_memory` states in host memory and spills older ones to files in `spill_dir` (each rank its own
shards); restoring a spilled state reads it back, bitwise the same.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from msft_fast.state.copy_engine import CopyEngine, copy_engine_for
from msft_fast.runtime.distributed import reshard_all
from msft_fast.errors import ConfigError
from msft_fast.runtime.fault_injection import fault_point
from msft_fast.runtime.preflight import host_available_memory


def sharded_params(model: nn.Module) -> list[torch.Tensor]:
    """This rank's shards. After a forward without backward (an evaluation) FSDP2 leaves the root's
    parameters unsharded, as temporary full copies: reshard first so we read and write the real
    shards, never those copies."""
    if isinstance(model, FSDPModule):
        reshard_all(model)
    params = list(model.parameters())
    if isinstance(model, FSDPModule) and not all(isinstance(p, DTensor) for p in params):
        raise RuntimeError("a snapshot needs every parameter sharded; some are still unsharded")
    return [_local(p) for p in params]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    """Per parameter (in model order), its optimizer state as local tensors ({} before the first step)."""
    return [{k: _local(v) for k, v in optimizer.state[p].items() if torch.is_tensor(v)} if p in optimizer.state else {}
            for p in model.parameters()]


@dataclass(eq=False)  # identity, not tensor contents, tells snapshots apart
class Snapshot:
    """One captured training state on this rank. `refs` counts who still needs it."""

    params: list[torch.Tensor]
    optim: Optional[list[dict[str, torch.Tensor]]]  # None: weights only
    extra: dict[str, Any] = field(default_factory=dict)  # scheduler, data position, RNG (small)
    refs: int = 0
    uid: int = -1  # the same on every rank (captures are collective in order): names it in checkpoints
    spilled: Optional[str] = None  # the file holding params/optim while they are out of host memory

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.params)
        for state in self.optim or []:
            total += sum(t.numel() * t.element_size() for t in state.values())
        return total


class SnapshotPool:
    """Captures and restores training states; at most `capacity` alive at once."""

    def __init__(self, capacity: int, device: torch.device, with_optimizer: bool = True,
                 in_memory: Optional[int] = None, spill_dir: Optional[str] = None,
                 engine: Optional[CopyEngine] = None):
        if in_memory is not None and in_memory < capacity and spill_dir is None:
            raise ValueError("a pool that holds fewer states in memory than its capacity needs a spill_dir")
        self.capacity = capacity
        self.in_memory = capacity if in_memory is None else max(1, in_memory)
        self.spill_dir = spill_dir
        self.with_optimizer = with_optimizer
        self.engine = engine if engine is not None else copy_engine_for(device)
        self.alive: list[Snapshot] = []
        self._free: list[Snapshot] = []
        self.capture_seconds: list[float] = []
        self.restore_seconds: list[float] = []
        self.spill_seconds: list[float] = []
        self._next_uid = 0

    # Reference counting: a state lives while some task's best point or the best pooled point
    # refers to it; the last release returns its buffers to the free list.
    def retain(self, snap: Snapshot) -> Snapshot:
        snap.refs += 1
        return snap

    def release(self, snap: Optional[Snapshot]) -> None:
        if snap is None:
            return
        snap.refs -= 1
        if snap.refs < 0:
            raise RuntimeError("snapshot released more often than retained")
        if snap.refs == 0:
            self.alive.remove(snap)
            if snap.spilled is not None:
                os.unlink(snap.spilled)
                snap.spilled = None
            else:
                self._free.append(Snapshot(snap.params, snap.optim))  # its buffers, not its identity
            snap.params, snap.optim = [], None

    def capture(self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Snapshot:
        t0 = time.perf_counter()
        if len(self.alive) >= self.capacity:
            raise RuntimeError(f"snapshot pool is full ({self.capacity} states alive); a reference was not released")
        params = sharded_params(model)
        optim = optimizer_tensors(model, optimizer) if self.with_optimizer else None
        self._make_room()
        snap = self._buffers_for(params, optim)
        snap.extra = extra
        snap.uid, self._next_uid = self._next_uid, self._next_uid + 1
        self.engine.to_host(list(zip(snap.params, params)) + self._optim_pairs(snap.optim, optim))
        fault_point("snapshot_capture")
        self.alive.append(snap)
        self.capture_seconds.append(time.perf_counter() - t0)
        return snap

    def restore(self, snap: Snapshot, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Copy `snap` back into the model (and, if given and captured, the optimizer state)."""
        t0 = time.perf_counter()
        saved_params, saved_optim = self._tensors(snap)
        params = sharded_params(model)
        if len(params) != len(saved_params) or any(a.shape != b.shape for a, b in zip(params, saved_params)):
            raise RuntimeError("snapshot does not match the model it is restored into")
        pairs = list(zip(params, saved_params))
        if optimizer is not None and saved_optim is not None:
            for p, saved in zip(model.parameters(), saved_optim):
                if not saved:
                    optimizer.state.pop(p, None)  # captured before this parameter's first step
                    continue
                state = optimizer.state.get(p, {})
                if state.keys() < saved.keys():
                    # Live state only ever grows (full restores never clear it), so this is a bug.
                    raise RuntimeError("the optimizer has less state than the snapshot it restores")
                pairs += [(_local(state[k]), v) for k, v in saved.items()]
        self.engine.to_device(pairs)  # ordered after captures still copying into these buffers
        fault_point("snapshot_restore")  # weights back, the trainer's position not yet
        self.restore_seconds.append(time.perf_counter() - t0)

    # Spilling: the oldest in-memory state goes to a file, and its buffers serve the next capture.
    def _make_room(self) -> None:
        """Spill the oldest states held in memory until one more fits under `in_memory`."""
        while sum(s.spilled is None for s in self.alive) >= self.in_memory:
            self._spill(min((s for s in self.alive if s.spilled is None), key=lambda s: s.uid))

    def _spill(self, snap: Snapshot) -> None:
        t0 = time.perf_counter()
        self.engine.wait()  # the host reads the buffers
        os.makedirs(self.spill_dir, exist_ok=True)
        path = os.path.join(self.spill_dir, f"snapshot-{snap.uid}.pt")
        tmp = path + ".tmp"
        try:
            torch.save({"params": snap.params, "optim": snap.optim}, tmp)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise RuntimeError(f"cannot spill a snapshot to {self.spill_dir} ({e.strerror or e})") from None
        self._free.append(Snapshot(snap.params, snap.optim))
        snap.params, snap.optim, snap.spilled = [], None, path
        self.spill_seconds.append(time.perf_counter() - t0)

    @staticmethod
    def _tensors(snap: Snapshot):
        """(params, optim) of a state, read back from its file if it was spilled."""
        if snap.spilled is None:
            return snap.params, snap.optim
        data = torch.load(snap.spilled, map_location="cpu", mmap=True, weights_only=True)
        return data["params"], data["optim"]

    # Checkpoints carry the alive states, so a resumed mSFT run can still roll back to them.
    def state_dict(self) -> dict[str, Any]:
        self.engine.wait()  # the host reads the buffers
        states = []
        for s in self.alive:
            params, optim = self._tensors(s)  # a spilled state is read back once
            states.append({"uid": s.uid, "refs": s.refs, "params": params, "optim": optim, "extra": s.extra})
        return {"snapshots": states,
                "next_uid": self._next_uid, "capture_seconds": self.capture_seconds,
                "restore_seconds": self.restore_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> dict[int, Snapshot]:
        """Adopt the states of a checkpoint; returns them by uid."""
        if self.alive:
            raise RuntimeError("a pool adopts checkpointed states only while empty")
        pin = (lambda t: t.pin_memory()) if self.engine.pinned else (lambda t: t)  # noqa: E731
        for s in sorted(state["snapshots"], key=lambda s: s["uid"]):
            optim = None if s["optim"] is None else [{k: pin(v) for k, v in d.items()} for d in s["optim"]]
            snap = Snapshot([pin(t) for t in s["params"]], optim, s["extra"], s["refs"], s["uid"])
            self._make_room()
            self.alive.append(snap)
        self._free.clear()  # buffers of spilled adopted states: freshly loaded, not worth keeping
        if len(self.alive) > self.capacity:
            raise RuntimeError("the checkpoint holds more snapshot states than the pool's capacity")
        self._next_uid = state["next_uid"]
        self.capture_seconds = list(state["capture_seconds"])
        self.restore_seconds = list(state["restore_seconds"])
        return {s.uid: s for s in self.alive}

    def wait(self) -> None:
        """Call before anything writes the parameters or optimizer state (the optimizer step): on
        CUDA the compute stream then waits for pending captures to read them; the host never waits."""
        self.engine.before_write()

    # -------------------------------------------------------------------------------------------

    def _buffers_for(self, params, optim) -> Snapshot:
        for i, snap in enumerate(self._free):
            if _same_layout(snap, params, optim):
                return self._free.pop(i)
        if self._free:  # a layout change (the optimizer state appeared): drop old buffers
            self._free.clear()
        new = self.engine.host_buffer
        return Snapshot([new(t) for t in params],
                        None if optim is None else [{k: new(v) for k, v in s.items()} for s in optim])

    @staticmethod
    def _optim_pairs(dst_optim, src_optim):
        if dst_optim is None:
            return []
        return [(dst[k], src[k]) for dst, src in zip(dst_optim, src_optim) for k in src]


def _same_layout(snap: Snapshot, params, optim) -> bool:
    if [t.shape for t in snap.params] != [t.shape for t in params]:
        return False
    if (snap.optim is None) != (optim is None):
        return False
    if optim is None:
        return True
    return all(a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a) for a, b in zip(snap.optim, optim))


# ---------------------------------------------------------------------------------------------
# Planning the pool's host memory before training


def host_memory_available() -> Optional[int]:
    """Host memory available to the run (bytes): the preflight's reading, which honours
    $MSFT_FAST_HOST_MEMORY_GIB."""
    return host_available_memory()


def host_buffer_bytes(nbytes: int, pinned: bool) -> int:
    """Host memory a snapshot buffer of `nbytes` takes: torch's pinned-memory allocator rounds every
    block up to a power of two (a 1.05 GB shard takes 2 GiB), pageable memory takes what it asks."""
    return 1 << max(0, nbytes - 1).bit_length() if pinned and nbytes > 0 else nbytes


def plan_pool(model: nn.Module, states: int, with_optimizer: bool, ranks_per_host: int,
              optimizer_tensors_per_param: int = 2, spill_dir: Optional[str] = None,
              pinned: bool = False) -> dict[str, Any]:
    """Worst-case host bytes of the pool on this rank and on its host, and how many states stay in
    host memory (the rest spill to `spill_dir`); stop if they do not fit and there is no spill_dir.

    Adam keeps two fp32 tensors per parameter (exp_avg, exp_avg_sq), hence the default factor; each
    is the size of its (fp32) parameter shard. pinned: buffers are page-locked (CUDA), each rounded
    up to a power of two (`host_buffer_bytes`).
    """
    sizes = [host_buffer_bytes(t.numel() * t.element_size(), pinned) for t in sharded_params(model)]
    per_state = sum(sizes) * (1 + (optimizer_tensors_per_param if with_optimizer else 0))
    per_rank = per_state * states
    per_host = per_rank * ranks_per_host
    available = host_memory_available()
    plan = {"states": states, "bytes_per_state": per_state, "bytes_per_rank": per_rank, "bytes_per_host": per_host,
            "host_available": available if available is not None else -1, "in_memory_states": states,
            "spill_dir": None, "pinned": pinned}
    if available is None or per_host <= 0.8 * available:
        return plan
    fit = int(0.8 * available // max(1, per_state * ranks_per_host))
    if spill_dir is None or fit < 1:
        hint = ("set msft.snapshot_spill_dir to spill older states to disk, " if spill_dir is None else
                "not even one state fits in host memory; ")
        raise ConfigError(
            f"the mSFT snapshot pool needs {per_host / 2**30:.1f} GiB of host memory on this host "
            f"({states} states x {per_state / 2**30:.2f} GiB x {ranks_per_host} ranks) but "
            f"{available / 2**30:.1f} GiB is available; {hint}use more nodes, fewer tasks, or msft.restore=weights"
        )
    plan.update(in_memory_states=min(fit, states), spill_dir=spill_dir)
    return plan


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
