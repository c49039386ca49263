"""Resumable checkpoints: everything a run needs to continue exactly as if it had not stopped.

A checkpoint is a folder `checkpoints/step-NNNNNNNN` (optimizer steps ever taken) holding
- the model and optimizer state, sharded, through `torch.distributed.checkpoint` (no gather);
- `rank-R.pt` per rank: its RNG state and the snapshot pool's states (its own shards), so a resumed
  mSFT run can still roll back to a state captured before the interruption;
- `state.pkl`: counters, lr schedule, active tasks, the method's state (snapshots by uid);
- `history.json`: the run's history at that step, and the length of metrics.jsonl;
- `meta.json`, written last: a folder without it is incomplete and never loaded.
Every rank writes into `step-N.tmp`; once all have finished, rank 0 renames it, so a crash while
writing leaves the previous checkpoint the newest complete one. Older checkpoints beyond
`train.keep_checkpoints` are deleted, their `meta.json` first. What a crash leaves behind (a
`step-N.tmp`, a `step-N` without `meta.json`) is never loaded: it is logged by name when the newest
checkpoint is looked up, and removed after the next checkpoint is complete.

Resuming needs the same world size: snapshot states are per-rank shards.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from msft_fast.state.atomic_io import write_json_atomic
from msft_fast.runtime.distributed import DistContext, all_gather_object
from msft_fast.errors import OutputError
from msft_fast.runtime.fault_injection import fault_point
from msft_fast.state.snapshot import Snapshot

log = logging.getLogger("msft_fast")

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})$")
_UNFINISHED = re.compile(r"^step-(\d{8,})\.tmp$")


class CheckpointError(OSError):
    """Writing a checkpoint failed on some rank (disk full, say); the previous one is intact."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_DIR)


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.exists(os.path.join(root, name, META_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def incomplete_checkpoints(output_dir: str) -> list[tuple[str, str]]:
    """(folder, why) of what a crash left behind: a write or a deletion that did not finish."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if _UNFINISHED.match(name):
            found.append((path, "its write did not finish"))
        elif _NAME.match(name) and not os.path.exists(os.path.join(path, META_FILE)):
            found.append((path, f"it has no {META_FILE}"))
    return found


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint, or None; incomplete folders are skipped and logged by name."""
    if _rank() == 0:
        for path, why in incomplete_checkpoints(output_dir):
            log.warning("ignoring the incomplete checkpoint %s (%s)", path, why)
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Method state: any picklable object; snapshots in it are stored by uid, their tensors per rank.


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Snapshot):
            if obj.refs <= 0:
                raise RuntimeError("the method state refers to a released snapshot")
            return ("snapshot", obj.uid)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, snapshots: dict[int, Snapshot]):
        super().__init__(f)
        self.snapshots = snapshots

    def persistent_load(self, pid):
        kind, uid = pid
        if kind != "snapshot" or uid not in self.snapshots:
            raise RuntimeError(f"checkpoint refers to snapshot {uid}, which it does not hold")
        return self.snapshots[uid]


def dump_method_state(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def load_method_state(data: bytes, snapshots: dict[int, Snapshot]) -> Any:
    return _Unpickler(io.BytesIO(data), snapshots).load()


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class PendingCheckpoint:
    """An asynchronous checkpoint whose model and optimizer shards are still being written."""

    future: Any
    tmp: str
    final: str
    meta: dict
    output_dir: str
    keep: int


def save_checkpoint(ctx: DistContext, output_dir: str, steps_trained: int, model, optimizer,
                    trainer_state: dict[str, Any], method_state: Any, rank_state: dict[str, Any], history: dict,
                    metrics_bytes: int, keep: int, asynchronous: bool = False) -> "str | PendingCheckpoint":
    """Write one checkpoint with every rank; return its folder. Raises CheckpointError (on every
    rank) if any rank failed to write, after removing the incomplete folder.

    asynchronous: the shards are copied to host memory here and written by a background thread;
    the checkpoint becomes complete (renamed into place) in `finish_checkpoint`, which every rank
    calls before the next checkpoint and at the end of training.
    """
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{steps_trained:08d}")
    tmp = final + ".tmp"
    meta = {"format_version": FORMAT_VERSION, "steps_trained": steps_trained, "world_size": ctx.world_size,
            "metrics_bytes": metrics_bytes, "asynchronous": asynchronous}
    error, future = None, None
    try:
        if ctx.is_main:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if asynchronous:
            future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp,
                                    process_group=ctx.checkpoint_group)
        else:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        fault_point("checkpoint_write")  # shards written; rank state, method state and meta.json not yet
        torch.save(rank_state, os.path.join(tmp, f"rank-{ctx.rank}.pt"))
        if ctx.is_main:
            with open(os.path.join(tmp, "state.pkl"), "wb") as f:
                pickle.dump({"trainer": trainer_state, "method": dump_method_state(method_state)}, f)
            write_json_atomic(os.path.join(tmp, "history.json"), history)
    except OSError as e:
        error = f"rank {ctx.rank}: {e.strerror or e}"
    pending = PendingCheckpoint(future, tmp, final, meta, output_dir, keep)
    if future is not None and error is None:
        return pending
    return _complete(ctx, pending, error)


def finish_checkpoint(ctx: DistContext, pending: PendingCheckpoint) -> str:
    """Wait for an asynchronous checkpoint's shards and make it complete (every rank calls this)."""
    error = None
    try:
        pending.future.result()
    except Exception as e:  # the writer thread's OSError arrives wrapped or as is
        cause = e if isinstance(e, OSError) else (e.__cause__ or e)
        error = f"rank {ctx.rank}: {getattr(cause, 'strerror', None) or cause}"
    return _complete(ctx, pending, error)


def _complete(ctx: DistContext, pending: PendingCheckpoint, error: Optional[str]) -> str:
    """All ranks agree the shards are written; then rank 0 adds meta.json and renames the folder."""
    errors = [e for e in all_gather_object(error) if e is not None]
    if errors:
        if ctx.is_main:
            shutil.rmtree(pending.tmp, ignore_errors=True)
        _barrier()
        raise CheckpointError(f"checkpoint at step {pending.meta['steps_trained']} was not written "
                              f"({'; '.join(errors)})")
    if ctx.is_main:
        write_json_atomic(os.path.join(pending.tmp, META_FILE),
                          {**pending.meta, "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if os.path.exists(pending.final):  # a checkpoint of the same step from a run that was cut short
            _remove(pending.final)
        os.replace(pending.tmp, pending.final)
        _fsync_dir(os.path.dirname(pending.final))
        _prune(pending.output_dir, pending.keep)
    _barrier()
    return pending.final


def _prune(output_dir: str, keep: int) -> None:
    for path in complete_checkpoints(output_dir)[:-keep]:
        _remove(path)
    for path, _ in incomplete_checkpoints(output_dir):  # left by a crash mid-write or mid-deletion
        shutil.rmtree(path, ignore_errors=True)


def _remove(path: str) -> None:
    """Delete a checkpoint, meta.json first: a half-deleted folder is never taken for complete."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, META_FILE))
    fault_point("checkpoint_prune")
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------------------------------------
# Reading


class LoadedCheckpoint:
    """What `load_checkpoint` read besides the model and optimizer (which it loads in place)."""

    def __init__(self, path: str, meta: dict, state: dict, rank_state: dict, history: dict):
        self.path, self.meta, self.rank_state, self.history = path, meta, rank_state, history
        self.trainer_state: dict[str, Any] = state["trainer"]
        self._method_bytes: bytes = state["method"]

    def method_state(self, snapshots: dict[int, Snapshot]) -> Any:
        """The method's state, its snapshot references bound to the pool's adopted states."""
        return load_method_state(self._method_bytes, snapshots)


def load_checkpoint(ctx: DistContext, path: str, model, optimizer) -> LoadedCheckpoint:
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise OutputError(f"checkpoint {path} has format {meta.get('format_version')}, this release reads "
                          f"{FORMAT_VERSION}; pass --overwrite to start over")
    if meta["world_size"] != ctx.world_size:
        error = OutputError(f"checkpoint {path} was written by {_ranks(meta['world_size'])} and this run has "
                            f"{_ranks(ctx.world_size)}: resume it with {_ranks(meta['world_size'])} (snapshot states "
                            f"are per-rank shards), or pass --overwrite to start over")
        error.all_ranks = True  # every rank read the same meta.json: one line, printed by rank 0
        raise error
    load_weights_and_optimizer(path, model, optimizer)
    rank_state = torch.load(os.path.join(path, f"rank-{ctx.rank}.pt"), weights_only=False)
    with open(os.path.join(path, "state.pkl"), "rb") as f:
        state = pickle.load(f)
    with open(os.path.join(path, "history.json"), encoding="utf-8") as f:
        history = json.load(f)
    return LoadedCheckpoint(path, meta, state, rank_state, history)


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def load_weights_and_optimizer(path: str, model, optimizer) -> None:
    """Only the model and optimizer of a checkpoint (the non-finite-step recovery)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
