"""Reports built from a run's `history.json` alone: per-task validation curves (`curves.png`), a
summary with the stage table (`report.md`), and a table comparing several runs.

Data flows one way: `load` reads a history into plain data; `markdown` and `plots` turn that into
text and a figure; `write` puts both into the output folder. `formatting` and `files` are the
shared ends (numbers in words, file names and atomic writes).

No training code is imported here, and matplotlib only inside the functions that draw, so importing
this package is cheap and a report can be made on any machine that has the output folder.
"""
# _Run and _draw_curve are not public API: tests import them from here to check a run's derived
# numbers and a single drawn curve, as they did when this package was one module.
from msft_fast.report.files import CURVES_FILE, HISTORY_FILE, REPORT_FILE, write_text_atomic
from msft_fast.report.formatting import format_flops, format_seconds
from msft_fast.report.load import _Run, load_history
from msft_fast.report.markdown import STOP_TEXT, compare, describe_compute, render_markdown
from msft_fast.report.plots import FIG_SIZE_PX, _draw_curve, use_log_axis, write_curves
from msft_fast.report.write import PeriodicReport, write_report

__all__ = [
    "CURVES_FILE", "FIG_SIZE_PX", "HISTORY_FILE", "REPORT_FILE", "STOP_TEXT", "PeriodicReport", "compare",
    "describe_compute", "format_flops", "format_seconds", "load_history", "render_markdown", "use_log_axis",
    "write_curves", "write_report", "write_text_atomic",
]
