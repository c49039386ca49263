"""Progress on the console: a live bar only on a terminal; periodic log lines in logs and pipes."""
from __future__ import annotations

import io
import logging

from msft_fast.progress import ProgressLines, make_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_on_a_terminal():
    from tqdm import tqdm

    bar = make_progress(10, enabled=True, stream=_Terminal())
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()
    piped = make_progress(10, enabled=True, stream=io.StringIO())
    assert isinstance(piped, ProgressLines)
    assert make_progress(10, enabled=False, stream=_Terminal()) is None


def test_progress_lines_every_interval_with_eta(caplog):
    now = [0.0]
    lines = ProgressLines(total=100, interval=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        for step in range(1, 41):
            now[0] = step * 1.0  # one step a second
            lines.update(1)
            lines.set_postfix(loss=f"{1 / step:.4f}", tok_s="900", epoch=f"{step / 50:.2f}", refresh=False)
        lines.close()
    got = [r.getMessage() for r in caplog.records]
    # one line after 30 s (step 30), and the last step at the end
    assert got == ["step 30/100 (30%), loss 0.0345, tokens/s 900, epoch 0.58, 1.00 steps/s, ETA 1:10",
                   "step 40/100 (40%), loss 0.0250, tokens/s 900, epoch 0.80, 1.00 steps/s, ETA 1:00"]
    assert not any("\r" in m for m in got)


def test_progress_lines_without_a_known_total(caplog):
    now = [0.0]
    lines = ProgressLines(total=None, interval=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        now[0] = 10.0
        lines.update(20)
        lines.close()  # nothing new since the last line: no repeat
    assert [r.getMessage() for r in caplog.records] == ["step 20, 2.00 steps/s"]
