"""Numbers in words for the reports and the console: FLOPs, seconds, metric values."""
from __future__ import annotations

import math
from typing import Any, Optional

from msft_fast.report.load import _float

_FLOP_UNITS = [(1.0, "FLOP"), (1e3, "kFLOP"), (1e6, "MFLOP"), (1e9, "GFLOP"), (1e12, "TFLOP"),
               (1e15, "PFLOP"), (1e18, "EFLOP"), (1e21, "ZFLOP")]


def format_flops(x: Any) -> str:
    """`1.23 PFLOP`: three significant digits in the largest unit that keeps the number >= 1."""
    v = _float(x)
    if v is None:
        return "-"
    if v == 0:
        return "0 FLOP"
    scale, unit = _FLOP_UNITS[0]
    for s, u in _FLOP_UNITS:
        if abs(v) >= s * (1 - 5e-4):  # 999.96 TFLOP rounds to 1.00 PFLOP, not "1e+03 TFLOP"
            scale, unit = s, u
    return f"{_sig3(v / scale)} {unit}"


def _flops_axis_unit(max_flops: float) -> tuple[float, str]:
    scale, unit = _FLOP_UNITS[0]
    for s, u in _FLOP_UNITS:
        if max_flops >= s:
            scale, unit = s, u
    return scale, unit


def _sig3(v: float) -> str:
    s = f"{v:#.3g}"  # '#': keep trailing zeros (1.00), then drop a bare trailing point (123.)
    return s if "e" in s else s.rstrip(".")


def format_seconds(x: Any) -> str:
    v = _float(x)
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.1f} s"
    h, rem = divmod(int(round(v)), 3600)
    m, s = divmod(rem, 60)
    return f"{v:.0f} s ({h}:{m:02d}:{s:02d})"


def _num(x: Any, fmt: str = ".4f") -> str:
    v = _float(x)
    return "-" if v is None else format(v, fmt)


def _int(x: Any) -> str:
    v = _float(x)
    return "-" if v is None or math.isnan(v) else str(int(round(v)))


def _epoch(x: Any) -> str:
    v = _float(x)
    return "-" if v is None else f"{v:.4g}"


def _pct(part: Optional[float], whole: Optional[float]) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.1f}%"
