"""Helpers shared by the benchmarks: run one measurement in a fresh interpreter, peak RSS, tables."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["ROOT", "emit", "markdown_table", "median", "peak_rss_mb", "run_worker"]


def run_worker(module: str, *args: str) -> dict:
    """`python -m MODULE --worker ARGS...` in the repository root; its last stdout line is JSON.

    Keep the calling process small: on Linux a child's ru_maxrss starts from its parent's RSS
    (the high-water mark survives exec), so a large parent would inflate every measurement."""
    cmd = [sys.executable, "-m", module, "--worker", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """ru_maxrss in MB (kilobytes on Linux, bytes on macOS). RUSAGE_CHILDREN gives the largest reaped child."""
    rss = resource.getrusage(who).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def emit(result: dict) -> None:
    """What a worker prints last, for `run_worker`."""
    print(json.dumps(result), flush=True)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
