"""Fault injection for the crash tests: SIGKILL this process at a named point of a run.

The run calls `fault_point(NAME)` at a few places where a crash is interesting (mid-step, mid-
evaluation, mid-snapshot, mid-checkpoint write, mid-export). Two environment variables, read at the
first call, turn them on; unset (every real run) a call costs one global lookup and a comparison.

    MSFT_FAST_KILL_AT=NAME:N      SIGKILL this process the N-th time (from 1) it passes fault_point(NAME)
    MSFT_FAST_FAULT_TRACE=FILE    append the NAME of every point passed to FILE, one a line, flushed at
                                  once (a test reads an uninterrupted run's trace to plan where to kill);
                                  "{rank}" in FILE becomes the process's RANK, one trace per rank

On several ranks every rank counts its own passes, so all ranks that pass a point die there.
"""
from __future__ import annotations

import os
import signal
from typing import Optional, TextIO

KILL_AT_ENV = "MSFT_FAST_KILL_AT"
TRACE_ENV = "MSFT_FAST_FAULT_TRACE"
# Every name passed to fault_point.
POINTS = ("evaluate", "snapshot_capture", "train_step", "checkpoint_write", "checkpoint_prune", "snapshot_restore",
          "export")


class _Armed:
    def __init__(self, kill_at: Optional[str], trace: Optional[str]):
        self.target, self.count, self.passes = None, 0, 0
        if kill_at:
            name, sep, count = kill_at.rpartition(":")
            if not sep or name not in POINTS or not count.isdigit() or int(count) < 1:
                raise ValueError(f"{KILL_AT_ENV}={kill_at!r}: expected NAME:N with NAME one of {', '.join(POINTS)}")
            self.target, self.count = name, int(count)
        if trace:
            trace = trace.replace("{rank}", os.environ.get("RANK", "0"))
        self.trace: Optional[TextIO] = open(trace, "a", encoding="utf-8") if trace else None

    def hit(self, name: str) -> None:
        if self.trace is not None:
            self.trace.write(name + "\n")
            self.trace.flush()
        if name == self.target:
            self.passes += 1
            if self.passes == self.count:
                os.kill(os.getpid(), signal.SIGKILL)


_state: "Optional[_Armed] | bool" = None  # None: not read yet; False: off


def fault_point(name: str) -> None:
    """A place where a test may kill the process (see the module docstring)."""
    global _state
    if _state is False:
        return
    if _state is None:
        kill_at, trace = os.environ.get(KILL_AT_ENV), os.environ.get(TRACE_ENV)
        _state = _Armed(kill_at, trace) if (kill_at or trace) else False
        if _state is False:
            return
    _state.hit(name)
