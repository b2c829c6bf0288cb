"""What machine this is (CPU model, GPUs), without importing torch: for run records and reports."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "none found (no nvidia-smi)"
    try:
        res = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "nvidia-smi did not answer"
    names = [line.strip() for line in res.stdout.splitlines() if line.strip()]
    return "; ".join(names) if res.returncode == 0 and names else "none found"
