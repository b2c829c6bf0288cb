"""The GPU figures in one command: `python -m bench.gpu` on a machine with a CUDA GPU.

Training: the real step of our loop (`Trainer.train_step`: bf16 autocast, SDPA flash attention, fused
AdamW, fused LM-head loss), eager and under `torch.compile`, for the 512/8/8 `original` preset
(58.5M, vocabulary 64,794) and the `125m` preset, on random tokens. MFU = tokens/s x FLOPs per
token (6 x matmul parameters + attention) / the GPU's dense bf16 peak (looked up by name; pass
--peak-tflops to override). Generation: greedy tokens/s of the `original` model with the KV cache at
batch 1 and 8, and the time to the first token.

The figures need a GPU; the test suite runs this code on the CPU with a tiny model
(tests/bench/test_gpu_script.py) so that it cannot rot unnoticed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from bench.train_vs_hf import RandomBatches


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_figures(preset: str, batch: int, steps: int, compile: bool, peak: float | None,
                  device: str = "cuda") -> dict:
    import torch

    from babyllama.config import load_config
    from babyllama.model import Llama
    from babyllama.train.loop import Trainer
    from babyllama.runtime import peak_flops

    run = load_config(preset_name=preset)
    mcfg = run.model
    if mcfg.vocab_size == 0:
        mcfg.vocab_size = 64794
    tcfg = run.train
    tcfg.batch_size, tcfg.grad_accum, tcfg.device, tcfg.dtype, tcfg.compile = batch, 1, device, "auto", compile
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Llama(mcfg), mcfg, tcfg, RandomBatches(mcfg.vocab_size, batch, mcfg.max_seq_len), tmp,
                          progress=False)
        warm = 10 if compile else 3
        t_compile = time.perf_counter()
        for _ in range(warm):
            trainer.train_step()
        _sync(device)
        t_compile = time.perf_counter() - t_compile
        on_gpu = device.startswith("cuda")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        _sync(device)
        dt = (time.perf_counter() - t0) / steps
    tok_s = batch * mcfg.max_seq_len / dt
    peak = peak or peak_flops(trainer.device, trainer.dtype)
    return {"preset": preset, "params_M": round(mcfg.num_params() / 1e6, 1), "batch": batch, "compile": compile,
            "dtype": str(trainer.dtype), "tok_s": round(tok_s),
            "mfu": round(tok_s * mcfg.flops_per_token() / peak, 3) if peak else None,
            "step_ms": round(dt * 1e3, 1), "warmup_s": round(t_compile, 1),
            "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None}


def generation_figures(batch: int, new_tokens: int = 256, device: str = "cuda", preset: str = "original") -> dict:
    import torch

    from babyllama.config import load_config
    from babyllama.infer.decode import prepare_for_decoding
    from babyllama.infer.engine import Engine
    from babyllama.infer.sampling import SamplingConfig
    from babyllama.model import Llama

    mcfg = load_config(preset_name=preset).model
    mcfg.vocab_size = mcfg.vocab_size or 64794
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = Llama(mcfg).to(device=device, dtype=dtype).eval()
    engine = Engine(prepare_for_decoding(model))  # what Engine.load does; the compiled step is a CUDA graph on GPUs
    prompt = torch.randint(mcfg.vocab_size, (batch, 32)).tolist()
    greedy = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    for _ in engine.stream(prompt, 8, greedy):
        pass
    _sync(device)
    t0 = time.perf_counter()
    stream = engine.stream(prompt, new_tokens, greedy)
    next(stream)
    _sync(device)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in stream)
    _sync(device)
    t2 = time.perf_counter()
    return {"generate_batch": batch, "dtype": str(dtype), "tok_s": round(batch * (n - 1) / (t2 - t1)),
            "first_token_ms": round((t1 - t0) * 1e3, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU, if its name is not known")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU (this machine has none); see bench/__main__.py for CPU figures")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for preset, batch in (("original", 64), ("125m", 32)):
        for compile in ((False,) if args.no_compile else (False, True)):
            print(json.dumps(train_figures(preset, batch, args.steps, compile, peak)), flush=True)
    for batch in (1, 8):
        print(json.dumps(generation_figures(batch)), flush=True)


if __name__ == "__main__":
    main()
