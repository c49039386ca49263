"""Writes an output folder's `curves.png` and `report.md`: once, or now and then while a run goes on."""
from __future__ import annotations

import os
import time
from typing import Optional

from msft_fast.report.files import CURVES_FILE, REPORT_FILE, write_text_atomic
from msft_fast.report.load import load_run
from msft_fast.report.markdown import render_markdown
from msft_fast.report.plots import write_curves


def write_report(output_dir: str, history: Optional[dict] = None) -> tuple[str, str]:
    """Write `curves.png` and `report.md` into `output_dir` from its `history.json` (or from
    `history`, when the caller already holds it). Returns (png_path, md_path)."""
    run = load_run(output_dir, history)
    png = os.path.join(output_dir, CURVES_FILE)
    md = os.path.join(output_dir, REPORT_FILE)
    write_curves(run, png)
    write_text_atomic(md, render_markdown(run))
    return png, md


class PeriodicReport:
    """Rewrites `report.md` and `curves.png` while a run goes on, at most every `interval` seconds.
    Rendering the figure takes about 0.5 s: on a small model that is a sizeable share of a stage
    (bench/results/msft_overhead_cpu.md), on a large one it is nothing. The run writes the report
    at its end regardless, and `msft-fast report DIR` redraws it from history.json at any time."""

    def __init__(self, output_dir: str, interval: float = 60.0):
        self.output_dir, self.interval = output_dir, interval
        self._last = time.monotonic()

    def __call__(self, history: dict) -> None:
        if time.monotonic() - self._last >= self.interval:
            write_report(self.output_dir, history)
            self._last = time.monotonic()
