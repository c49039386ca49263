"""Training progress on the console: a live tqdm bar on a terminal, periodic log lines elsewhere.

A bar redraws itself with carriage returns; in a log file or a pipe (a cluster job's output, `| tee`)
those frames pile up as one unreadable line. So the bar is used only when stderr is a terminal, and
otherwise a plain line is logged every `interval` seconds (and when training ends).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Optional, TextIO

log = logging.getLogger("msft_fast")


def make_progress(total: Optional[int], enabled: bool, interval: float = 30.0, stream: Optional[TextIO] = None):
    """A tqdm bar when `stream` (default stderr) is a terminal, else `ProgressLines`; None when
    disabled. `total` None: the number of steps is not known in advance (no ETA)."""
    if not enabled:
        return None
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.5, file=stream)
    return ProgressLines(total, interval)


class ProgressLines:
    """The part of tqdm's interface the trainer uses (update, set_postfix, write, clear, refresh,
    close), written as one log line every `interval` seconds: step, epoch, loss, tokens/s, ETA."""

    def __init__(self, total: Optional[int], interval: float, clock: Callable[[], float] = time.monotonic):
        self.total, self.interval, self.clock = total, interval, clock
        self.n = 0
        self.postfix: dict = {}
        self._last_t = clock()
        self._last_n = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self._last_t >= self.interval:
            self._emit()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def write(self, message: str) -> None:
        print(message, flush=True)  # as tqdm.write: evaluation lines go to stdout

    def clear(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.n > self._last_n:
            self._emit()

    def _emit(self) -> None:
        now = self.clock()
        rate = (self.n - self._last_n) / max(1e-9, now - self._last_t)
        where = f"step {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")
        parts = [where] + [f"{k.replace('tok_s', 'tokens/s')} {v}" for k, v in self.postfix.items()]
        parts.append(f"{rate:.2f} steps/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock_time((self.total - self.n) / rate)}")
        log.info("%s", ", ".join(parts))
        self._last_t, self._last_n = now, self.n


@contextlib.contextmanager
def above_progress(progress):
    """Write log lines without tearing a live bar: it is cleared first and redrawn after."""
    if progress is None:
        yield
        return
    progress.clear()
    try:
        yield
    finally:
        progress.refresh()


def _clock_time(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
