"""The run's checkpoints as the trainer keeps them (the folder format is checkpoint.py's): one
asynchronous write in flight at a time, a failed write logged while training goes on (the previous
checkpoint stays the newest), and the checkpoint a resumed run started from, whose metrics.jsonl
length, snapshot states and method state it hands back.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from msft_fast.state import checkpoint as ckpt
from msft_fast.runtime.distributed import DistContext
from msft_fast.state.snapshot import Snapshot, SnapshotPool
from msft_fast.training.trainer_state import Counters, rng_state

log = logging.getLogger("msft_fast")


class CheckpointKeeper:
    def __init__(self, ctx: DistContext, output_dir: str, keep: int, metrics_path: str):
        self.ctx, self.output_dir, self.keep, self.metrics_path = ctx, output_dir, keep, metrics_path
        self.newest: Optional[str] = None  # the newest complete checkpoint this run wrote or resumed from
        self.resumed: Optional[ckpt.LoadedCheckpoint] = None
        self._pending: Optional[ckpt.PendingCheckpoint] = None

    def save(self, counters: Counters, model, optimizer, trainer_state: dict, method_state: Any,
             pool: Optional[SnapshotPool], history: dict, asynchronous: bool) -> Optional[str]:
        """Write a checkpoint with every rank (a previous asynchronous one must be finished): the model
        and optimizer, `trainer_state` (trainer_state.checkpoint_state), the method's state, and per
        rank its RNG and snapshot states. Its folder, or None while it is written asynchronously or
        when the write failed. The time it takes goes into counters.checkpoint_seconds (after
        `trainer_state` was taken, so the checkpoint holds the time of those before it)."""
        if self._pending is not None:
            raise RuntimeError("one checkpoint in flight at a time: finish the previous one first")
        t0 = time.perf_counter()
        rank_state = {**rng_state(self.ctx.device), "pool": pool.state_dict() if pool is not None else None}
        metrics_bytes = os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0
        try:
            path = ckpt.save_checkpoint(self.ctx, self.output_dir, counters.steps_trained, model, optimizer,
                                        trainer_state, method_state, rank_state, history, metrics_bytes, self.keep,
                                        asynchronous)
        except ckpt.CheckpointError as e:
            self._failed(e)
            return None
        finally:
            counters.checkpoint_seconds += time.perf_counter() - t0
        if isinstance(path, ckpt.PendingCheckpoint):
            self._pending = path
            return None
        self.newest = path
        return path

    def finish(self, counters: Counters) -> Optional[str]:
        """Complete an asynchronous checkpoint still being written (a no-op when there is none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        t0 = time.perf_counter()
        try:
            self.newest = ckpt.finish_checkpoint(self.ctx, pending)
            return self.newest
        except ckpt.CheckpointError as e:
            self._failed(e)
            return None
        finally:
            counters.checkpoint_seconds += time.perf_counter() - t0

    def _failed(self, error: Exception) -> None:
        if self.ctx.is_main:
            log.error("%s; the previous checkpoint (%s) is intact; training goes on", error, self.newest or "none")

    def load(self, path: str, model, optimizer) -> ckpt.LoadedCheckpoint:
        """Load a checkpoint's weights and optimizer state in place; the rest is returned (and kept for
        `adopt_snapshots` and `method_state`). metrics.jsonl is cut back to its length at the checkpoint:
        the resumed run logs the later lines again."""
        loaded = ckpt.load_checkpoint(self.ctx, path, model, optimizer)
        if self.ctx.is_main and os.path.exists(self.metrics_path):
            os.truncate(self.metrics_path, min(loaded.meta["metrics_bytes"], os.path.getsize(self.metrics_path)))
        self.resumed, self.newest = loaded, path
        return loaded

    def adopt_snapshots(self, pool: SnapshotPool) -> dict[int, Snapshot]:
        """The resumed checkpoint's snapshot states of this rank, loaded into `pool`; by uid ({} for a fresh run)."""
        if self.resumed is None or self.resumed.rank_state["pool"] is None:
            return {}
        return pool.load_state_dict(self.resumed.rank_state["pool"])

    def method_state(self, snapshots: dict[int, Snapshot]) -> Any:
        """The method's state from the resumed checkpoint (None for a fresh run), its snapshot
        references bound to the adopted states."""
        return None if self.resumed is None else self.resumed.method_state(snapshots)
