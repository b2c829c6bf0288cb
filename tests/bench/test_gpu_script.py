"""bench/gpu.py is run by whoever has a GPU; its code paths are exercised here on the CPU so it
cannot rot unnoticed (the figures themselves need a GPU)."""

import torch

from babyllama.runtime import pick_dtype
from bench.gpu import generation_figures, train_figures


def test_gpu_benchmark_code_runs_on_cpu():
    row = train_figures("tiny", batch=2, steps=1, compile=False, peak=None, device="cpu")
    assert row["tok_s"] > 0 and row["params_M"] > 0 and row["dtype"] == str(pick_dtype("auto", torch.device("cpu")))
    gen = generation_figures(batch=2, new_tokens=4, device="cpu", preset="tiny")
    assert gen["tok_s"] > 0 and gen["first_token_ms"] > 0
