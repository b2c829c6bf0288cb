"""The bench parent must not import torch: every worker's ru_maxrss starts from its parent's RSS."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_parent_probes_bf16_without_importing_torch():
    from babyllama.runtime import cpu_has_fast_bf16

    code = ("import sys, bench.__main__, bench.train_vs_hf as t; has = t.cpu_has_fast_bf16(); "
            "print(has, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    has, torch_loaded = out.stdout.split()
    assert torch_loaded == "False"
    assert has == str(cpu_has_fast_bf16())
