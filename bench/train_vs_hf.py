"""Training tokens/s: our training step against Hugging Face `transformers` LlamaForCausalLM.

Both models have the same shape (vocabulary, width, SwiGLU width, layers, heads, kv heads, tied or
untied head, eps 1e-5, positions), see the same batch size of random tokens, run in float32 on the
same number of threads, and take a full optimizer step: forward, loss, backward, clip to 1.0,
AdamW(foreach) step, zero_grad.

- ours: the real step of the training loop, `Trainer.train_step()`, fed by an in-memory batch source.
  The Trainer tunes glibc malloc (`tune_cpu_allocator`: freed memory stays in the process), as
  every one of our CPU runs does.
- hf stock: `hf(input_ids=x, labels=x)`, backward, clip, step, in a fresh process with the default
  allocator, which is how users run it (config use_cache=False: no KV cache built while training).
- hf same allocator: the same, after the same `tune_cpu_allocator()` call, which isolates what
  the model code itself is worth from what the allocator setting is worth.
- ours compiled / hf compiled (full runs, or --compiled): each model under `torch.compile`
  (inductor, C++ on CPU), stock allocator for HF; the first steps, which compile, are not timed.
- ours bf16 / hf bf16 (full runs on CPUs with bf16 units, or --bf16): both steps under bf16 autocast
  (float32 weights and optimizer), the precision `--dtype auto` picks on such CPUs; HF with the stock
  allocator, as `Trainer(bf16=True)` users run it. Their MFU divides by the measured bf16 peak.

mallopt is process-wide, so every measurement runs in its own fresh interpreter; that also makes
its peak RSS (ru_maxrss) its own. The machine is shared and noisy, so the three kinds run
interleaved (ours, hf, hf, then the next round in rotated order) and the table shows the median
over all measured steps of all rounds. MFU = tokens/s x cfg.flops_per_token / measured CPU peak.

    python -m bench.train_vs_hf [--quick] [--configs demo original] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from bench.common import emit, markdown_table, median, peak_rss_mb, run_worker


class Setup(NamedTuple):
    shape: dict  # ModelConfig fields
    batch: int
    warmup: int  # steps per process before timing
    steps: int  # timed steps per process (--quick: 2)
    rounds: int  # processes per kind, interleaved


# `demo` is the model `make demo` trains, `tiny` the tiny preset at an 8k vocabulary, `original` the
# original project's table (58.5M parameters, tied head, ChatGLM2's 64,794 vocabulary). `original`
# takes seconds a step on 2 cores, hence few steps; --quick skips it. Its first steps still fault in
# fresh memory (~400 MB in step 2, ~130 MB in step 3, none after), so three warm-up steps: the
# timed ones are the steady state a long run sees.
CONFIGS = {
    "demo": Setup(dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4, max_seq_len=256, tie_embeddings=True),
                  batch=8, warmup=2, steps=6, rounds=3),
    "tiny": Setup(dict(vocab_size=8192, dim=256, n_layers=4, n_heads=4, max_seq_len=256, tie_embeddings=True),
                  batch=16, warmup=1, steps=3, rounds=3),
    "original": Setup(dict(vocab_size=64794, dim=512, n_layers=8, n_heads=8, max_seq_len=256, tie_embeddings=True),
                      batch=8, warmup=3, steps=2, rounds=2),
}
KINDS = ("ours", "hf_stock", "hf_same_alloc")
COMPILED = ("ours_compiled", "hf_compiled")  # torch.compile of each (inductor, C++ on CPU); full runs only
BF16 = ("ours_bf16", "hf_bf16")  # bf16 autocast; full runs on CPUs with bf16 units only


class RandomBatches:
    """The BatchSource protocol of the training loop over random tokens, made on the fly."""

    def __init__(self, vocab: int, batch: int, seq: int, seed: int = 0):
        import torch

        self.vocab, self.batch, self.seq = vocab, batch, seq
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self):
        import torch

        t = torch.randint(self.vocab, (self.batch, self.seq + 1), generator=self.gen)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def our_step(mcfg, batch: int, out_dir: str, compile: bool = False, dtype: str = "float32"):
    from babyllama.config import TrainConfig
    from babyllama.model import Llama
    from babyllama.train.loop import Trainer

    tcfg = TrainConfig(batch_size=batch, device="cpu", dtype=dtype, compile=compile, grad_clip=1.0)
    trainer = Trainer(Llama(mcfg), mcfg, tcfg, RandomBatches(mcfg.vocab_size, batch, mcfg.max_seq_len),
                      out_dir, progress=False)  # calls tune_cpu_allocator()
    return trainer.train_step, trainer.model.num_params()


def hf_step(mcfg, batch: int, compile: bool = False, bf16: bool = False):
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.dim, intermediate_size=mcfg.hidden_dim,
        num_hidden_layers=mcfg.n_layers, num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.n_kv_heads,
        max_position_embeddings=mcfg.max_seq_len, rms_norm_eps=1e-5, rope_theta=mcfg.rope_theta,
        tie_word_embeddings=mcfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        use_cache=False)  # no KV cache object built in training (in HF's favour)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    gen = torch.Generator().manual_seed(0)
    forward = torch.compile(hf) if compile else hf

    def step():
        x = torch.randint(mcfg.vocab_size, (batch, mcfg.max_seq_len), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step, sum(p.numel() for p in hf.parameters())


def worker(kind: str, config: str, threads: int, warmup: int, steps: int) -> dict:
    import torch

    from babyllama.config import ModelConfig
    from babyllama.runtime import peak_flops, tune_cpu_allocator

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch = CONFIGS[config].batch
    mcfg = ModelConfig(**CONFIGS[config].shape)
    with tempfile.TemporaryDirectory() as tmp:
        if kind.startswith("ours"):
            step, params = our_step(mcfg, batch, tmp, compile=kind == "ours_compiled",
                                    dtype="bfloat16" if kind in BF16 else "float32")
        else:
            if kind == "hf_same_alloc":
                tune_cpu_allocator()
            step, params = hf_step(mcfg, batch, compile=kind == "hf_compiled", bf16=kind in BF16)
        if kind in COMPILED:
            warmup += 2  # the first steps compile
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    peak = peak_flops(torch.device("cpu"), torch.bfloat16 if kind in BF16 else torch.float32)
    return {"kind": kind, "params": params, "step_s": times, "tokens_per_step": batch * mcfg.max_seq_len,
            "flops_per_token": mcfg.flops_per_token(), "peak_flops": peak, "rss_mb": peak_rss_mb()}


def bench_config(config: str, threads: int, rounds: int | None = None, steps: int | None = None, log=print,
                 compiled: bool = False, bf16: bool = False) -> dict:
    setup = CONFIGS[config]
    warmup, steps, rounds = setup.warmup, steps or setup.steps, rounds or setup.rounds
    kinds = KINDS + (COMPILED if compiled else ()) + (BF16 if bf16 else ())
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate who goes first
            res = run_worker("bench.train_vs_hf", kind, config, str(threads), str(warmup), str(steps))
            runs[kind].append(res)
            log(f"  {config} round {r + 1}/{rounds} {kind:<13} {res['tokens_per_step'] / median(res['step_s']):8.0f} tok/s"
                f"  rss {res['rss_mb']:.0f} MB")
    out = {"config": config}
    for kind, results in runs.items():
        tokens = results[0]["tokens_per_step"]
        out[kind] = {"tok_s": tokens / median([t for r in results for t in r["step_s"]]),
                     "rss_mb": max(r["rss_mb"] for r in results), "params": results[0]["params"]}
    for kind in ("ours", "ours_bf16"):
        if kind in runs:
            ours = runs[kind]
            out[kind]["mfu"] = out[kind]["tok_s"] * ours[0]["flops_per_token"] / median([r["peak_flops"] for r in ours])
    return out


def table(results: list[dict], threads: int) -> str:
    rows = []
    for r in results:
        o, s, a = r["ours"], r["hf_stock"], r["hf_same_alloc"]
        rows.append([r["config"], f"{o['params'] / 1e6:.1f}M", f"{o['tok_s']:,.0f}", f"{s['tok_s']:,.0f}",
                     f"{a['tok_s']:,.0f}", f"{o['tok_s'] / s['tok_s']:.2f}x", f"{o['tok_s'] / a['tok_s']:.2f}x",
                     f"{o['mfu']:.0%}", f"{o['rss_mb']:,.0f}", f"{s['rss_mb']:,.0f}", f"{a['rss_mb']:,.0f}"])
    headers = ["config", "params", "ours tok/s", "hf stock tok/s", "hf same-alloc tok/s", "ours/hf stock",
               "ours/hf same-alloc", "ours MFU", "ours RSS MB", "hf stock RSS MB", "hf same-alloc RSS MB"]
    text = (f"Training step, float32, {threads} threads, median of all measured steps "
            f"(each kind in its own process, rounds interleaved)\n\n" + markdown_table(headers, rows))
    compiled = [r for r in results if "hf_compiled" in r]
    if compiled:
        rows = [[r["config"], f"{r['ours_compiled']['tok_s']:,.0f}", f"{r['hf_compiled']['tok_s']:,.0f}",
                 f"{r['ours_compiled']['tok_s'] / r['hf_compiled']['tok_s']:.2f}x",
                 f"{r['ours']['tok_s'] / r['hf_compiled']['tok_s']:.2f}x",
                 f"{r['ours_compiled']['rss_mb']:,.0f}", f"{r['hf_compiled']['rss_mb']:,.0f}"] for r in compiled]
        text += ("\n\nUnder torch.compile (inductor; compile time not counted)\n\n"
                 + markdown_table(["config", "ours compiled tok/s", "hf compiled tok/s", "ours compiled/hf compiled",
                                   "ours eager/hf compiled", "ours compiled RSS MB", "hf compiled RSS MB"], rows))
    with_bf16 = [r for r in results if "hf_bf16" in r]
    if with_bf16:
        rows = [[r["config"], f"{r['ours_bf16']['tok_s']:,.0f}", f"{r['hf_bf16']['tok_s']:,.0f}",
                 f"{r['ours_bf16']['tok_s'] / r['hf_bf16']['tok_s']:.2f}x",
                 f"{r['ours_bf16']['tok_s'] / r['ours']['tok_s']:.2f}x", f"{r['ours_bf16']['mfu']:.0%}",
                 f"{r['ours_bf16']['rss_mb']:,.0f}", f"{r['hf_bf16']['rss_mb']:,.0f}"] for r in with_bf16]
        text += ("\n\nUnder bf16 autocast (this CPU has bf16 units, so `--dtype auto` trains in bf16; MFU against "
                 "the measured bf16 matmul peak)\n\n"
                 + markdown_table(["config", "ours bf16 tok/s", "hf bf16 tok/s", "ours/hf bf16",
                                   "ours bf16/ours float32", "ours bf16 MFU", "ours bf16 RSS MB",
                                   "hf bf16 RSS MB"], rows))
    return text


def cpu_has_fast_bf16() -> bool:
    """Asked in a child process: importing torch here would raise every worker's ru_maxrss
    (see bench.common.run_worker)."""
    code = "from babyllama.runtime import cpu_has_fast_bf16; print(cpu_has_fast_bf16())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


def main(quick: bool = False, configs: list[str] | None = None, rounds: int | None = None,
         threads: int = 2, log=print, compiled: bool | None = None, bf16: bool | None = None) -> str:
    configs = configs or (["demo", "tiny"] if quick else list(CONFIGS))
    steps = 2 if quick else None
    compiled = (not quick) if compiled is None else compiled
    bf16 = (not quick and cpu_has_fast_bf16()) if bf16 is None else bf16
    return table([bench_config(c, threads, rounds, steps, log, compiled, bf16) for c in configs], threads)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=5, metavar=("KIND", "CONFIG", "THREADS", "WARMUP", "STEPS"))
    p.add_argument("--quick", action="store_true", help="demo config only, fewer steps")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, help="interleaved rounds per kind (default: 3 demo, 2 original)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="also torch.compile both models (default: on in full runs, off with --quick)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="also both models under bf16 autocast (default: on in full runs on CPUs with bf16 units)")
    args = p.parse_args()
    if args.worker:
        kind, config, threads, warmup, steps = args.worker
        emit(worker(kind, config, int(threads), int(warmup), int(steps)))
    else:
        print(main(args.quick, args.configs, args.rounds, args.threads, compiled=args.compiled, bf16=args.bf16))


if __name__ == "__main__":
    cli()
