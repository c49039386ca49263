"""Training progress on the console: a live tqdm bar on a terminal, periodic log lines elsewhere.

A bar redraws itself with carriage returns; in a log file or a pipe (a cluster job's output, `| tee`)
those frames pile up as one unreadable line. So the bar is used only when stderr is a terminal, and
otherwise a plain line is logged every `interval` seconds (and when training ends).

Both show the same numbers, computed here rather than by tqdm: training tokens/s over the recent
steps' own time (an evaluation in between does not count), and an ETA made of the steps left at the
mean training time of a step plus the evaluations left at the mean measured time of one. A method
whose length is only bounded (mSFT) shows its worst case, marked with "<=".
"""
from __future__ import annotations

import collections
import contextlib
import logging
import sys
import time
from typing import Callable, Optional, TextIO

log = logging.getLogger("msft_fast")

RATE_WINDOW = 20  # steps behind the tokens/s shown


class RunClock:
    """Training and evaluation time, kept apart."""

    def __init__(self):
        self.steps, self.train_seconds = 0, 0.0
        self.evals, self.eval_seconds = 0, 0.0
        self._recent: collections.deque = collections.deque(maxlen=RATE_WINDOW)  # (tokens, seconds)

    def step(self, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.train_seconds += seconds
        self._recent.append((tokens, seconds))

    def evaluation(self, seconds: float) -> None:
        self.evals += 1
        self.eval_seconds += seconds

    def tokens_per_s(self) -> Optional[float]:
        """Over the last RATE_WINDOW steps' training time."""
        seconds = sum(s for _, s in self._recent)
        return sum(t for t, _ in self._recent) / seconds if seconds > 0 else None

    def eta(self, steps_left: int, evals_left: int) -> Optional[float]:
        """Seconds for `steps_left` steps and `evals_left` evaluations at the mean times measured so
        far; None until a step (and, when evaluations are left, an evaluation) has been timed."""
        if self.steps == 0 or (evals_left > 0 and self.evals == 0):
            return None
        per_eval = self.eval_seconds / self.evals if self.evals else 0.0
        return max(0, steps_left) * self.train_seconds / self.steps + max(0, evals_left) * per_eval


class Progress:
    """What the trainer reports: each step as its metrics record is complete (so a line names the
    step whose loss it shows), each evaluation's time, and messages to print above the bar.

    total_steps / total_evals: what the run will take (None: not known, no ETA); `worst_case`: they
    bound the run rather than predict it (mSFT), shown as "<=".
    """

    def __init__(self, display: "ProgressLines | _Bar", total_steps: Optional[int] = None,
                 total_evals: Optional[int] = None, worst_case: bool = False):
        self.display = display
        self.clock = RunClock()
        self.n = 0  # optimizer steps taken (kept and discarded)
        self.evals_done = 0
        self.set_total(total_steps, total_evals, worst_case)

    def set_total(self, total_steps: Optional[int], total_evals: Optional[int] = None,
                  worst_case: bool = False) -> None:
        self.total_steps, self.total_evals, self.worst_case = total_steps, total_evals, worst_case
        self.display.set_total(total_steps, worst_case)

    def resumed(self, steps: int, evals: int) -> None:
        """A resumed run starts counting where its checkpoint was."""
        self.n, self.evals_done = steps, evals
        self.display.moved(steps)

    def step(self, record: dict) -> None:
        """A step's completed metrics record (steps_trained, loss, epoch, tokens, step_seconds)."""
        self.clock.step(record["tokens"], record["step_seconds"])
        self.n = record["steps_trained"]
        fields = {"loss": f"{record['loss']:.4f}", "epoch": f"{record['epoch']:.2f}"}
        rate = self.clock.tokens_per_s()
        if rate is not None:
            fields["train tokens/s"] = f"{rate:.0f}"
        eta = self.eta()
        if eta is not None:
            fields["ETA"] = ("<=" if self.worst_case else "") + clock_time(eta)
        self.display.show(self.n, fields)

    def evaluation(self, seconds: float) -> None:
        self.clock.evaluation(seconds)
        self.evals_done += 1

    def eta(self) -> Optional[float]:
        if self.total_steps is None:
            return None
        evals_left = self.total_evals - self.evals_done if self.total_evals is not None else 0
        return self.clock.eta(self.total_steps - self.n, evals_left)

    def write(self, message: str) -> None:
        self.display.write(message)

    def clear(self) -> None:
        self.display.clear()

    def refresh(self) -> None:
        self.display.refresh()

    def close(self) -> None:
        self.display.close()


def make_progress(total: Optional[int], enabled: bool, interval: float = 30.0, stream: Optional[TextIO] = None,
                  total_evals: Optional[int] = None, worst_case: bool = False) -> Optional[Progress]:
    """A Progress on a tqdm bar when `stream` (default stderr) is a terminal, else on `ProgressLines`;
    None when disabled. `total` None: the number of steps is not known in advance (no ETA)."""
    if not enabled:
        return None
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    display = _Bar(stream) if isatty is not None and isatty() else ProgressLines(interval)
    return Progress(display, total, total_evals, worst_case)


class ProgressLines:
    """A log line every `interval` seconds (and at the end): the step and the fields it was shown with."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self.total: Optional[int] = None
        self.worst_case = False
        self.n, self.fields = 0, {}
        self._last_t, self._last_n = clock(), 0

    def set_total(self, total: Optional[int], worst_case: bool) -> None:
        self.total, self.worst_case = total, worst_case

    def moved(self, n: int) -> None:
        self.n = self._last_n = n

    def show(self, n: int, fields: dict) -> None:
        self.n, self.fields = n, fields
        if self.clock() - self._last_t >= self.interval:
            self._emit()

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
        where = f"step {self.n}"
        if self.total:
            bound = "<=" if self.worst_case else ""
            where += f"/{bound}{self.total} ({'>=' if self.worst_case else ''}{100 * self.n / self.total:.0f}%)"
        log.info("%s", ", ".join([where] + [f"{k} {v}" for k, v in self.fields.items()]))
        self._last_t, self._last_n = self.clock(), self.n


class _Bar:
    """A tqdm bar whose rate and remaining time are ours (in the postfix), not tqdm's: tqdm's
    wall-clock rate would count evaluations as training and its ETA would leave them out."""

    def __init__(self, stream: TextIO):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None, unit="step", dynamic_ncols=True, mininterval=0.5, file=stream,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def set_total(self, total: Optional[int], worst_case: bool) -> None:
        self.bar.total = total
        self.bar.refresh()

    def moved(self, n: int) -> None:
        self.bar.n = n
        self.bar.refresh()

    def show(self, n: int, fields: dict) -> None:
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(n - self.bar.n)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def clear(self) -> None:
        self.bar.clear()

    def refresh(self) -> None:
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


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


def clock_time(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
