"""How numbers, times and durations read in a report: the same everywhere, a dash for what is missing."""

from __future__ import annotations

import math
import time

MISSING = "—"


def number(value: object) -> str:
    """Integers with thousands separators; floats to 4 significant digits (whole numbers from 1,000)."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e7:
        return f"{value:.3e}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def percent(value: object) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return MISSING
    return f"{100 * value:.1f}%"


def millions(count: int | None) -> str:
    if count is None:
        return MISSING
    return f"{count / 1e6:.2f}M ({count:,})"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return MISSING
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
