"""Generation speed: our KV-cache decoding against `transformers` `generate`, the same weights.

Both decode greedily (no sampling, no repetition penalty: `generate`'s plain path) a fixed number
of new tokens after random prompts, float32, the same threads: one 32-token prompt, 8 of them, and
8 prompts of mixed lengths (8 to 64 tokens: left-padded with an attention mask for `generate`, a
ragged batch for our Engine), what a batching server or a batched evaluation sends. The Hugging Face model is
ours converted by `babyllama.export.hf` (same logits, tested). Reported per kind and batch size:

- time to first token: prompt in, first new token out (prefill + one sample);
- decode tokens/s: the remaining tokens of all rows / the time they took.

Each measurement runs in its own process (fresh allocator, its own peak RSS); kinds are interleaved
over rounds and the median kept, as the machine is shared and noisy.

    python -m bench.generate_vs_hf [--quick] [--configs demo original] [--threads N]
"""

from __future__ import annotations

import argparse
import time

from bench.common import emit, markdown_table, median, peak_rss_mb, run_worker

CONFIGS = {
    "demo": dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4, max_seq_len=256, tie_embeddings=True),
    "original": dict(vocab_size=64794, dim=512, n_layers=8, n_heads=8, max_seq_len=256, tie_embeddings=True),
}
KINDS = ("ours", "hf")
PROMPT = 32
BATCHES = ("1", "8", "8 mixed")  # "8 mixed": prompt lengths 8, 16, ..., 64


def _setup(config: str, batch: str):
    import torch

    from babyllama.config import ModelConfig
    from babyllama.model import Llama

    torch.manual_seed(0)
    model = Llama(ModelConfig(**CONFIGS[config])).eval()
    lengths = [8 * (i + 1) for i in range(8)] if batch == "8 mixed" else [PROMPT] * int(batch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return model, prompts


def ours(engine, prompts, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the rest)."""
    from babyllama.infer.sampling import SamplingConfig

    greedy = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    t0 = time.perf_counter()
    stream = engine.stream(prompts, new_tokens, greedy)
    next(stream)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in stream)
    assert n == new_tokens
    return t1 - t0, time.perf_counter() - t1


def hf(model, prompts, new_tokens: int) -> tuple[float, float]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    longest = max(len(p) for p in prompts)
    prompt = torch.zeros(len(prompts), longest, dtype=torch.long)  # left-padded, as generate expects
    mask = torch.zeros_like(prompt)
    for i, p in enumerate(prompts):
        prompt[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), 1
    streamer = FirstToken()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0)
    t2 = time.perf_counter()
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return streamer.first - t0, t2 - streamer.first


def worker(kind: str, config: str, batch: str, new_tokens: int, threads: int, rounds: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, prompts = _setup(config, batch)
    if kind == "hf":
        from babyllama.export.hf import to_hf_model

        model = to_hf_model(model)
        model.generation_config.eos_token_id = None
        run = hf
    else:
        from babyllama.infer.decode import prepare_for_decoding
        from babyllama.infer.engine import Engine

        model = Engine(prepare_for_decoding(model))  # what Engine.load does for every user
        run = ours
    run(model, prompts, 4)  # warm-up
    ttft, decode = [], []
    for _ in range(rounds):
        a, b = run(model, prompts, new_tokens)
        ttft.append(a)
        decode.append(b)
    return {"kind": kind, "ttft_s": median(ttft), "decode_tok_s": len(prompts) * (new_tokens - 1) / median(decode),
            "rss_mb": peak_rss_mb()}


def bench(config: str, batch: str, new_tokens: int, threads: int, rounds: int, log=print) -> dict:
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(rounds):
        for kind in KINDS[r % 2:] + KINDS[:r % 2]:
            res = run_worker("bench.generate_vs_hf", kind, config, batch, str(new_tokens), str(threads), "2")
            runs[kind].append(res)
            log(f"  {config} batch {batch} round {r + 1}/{rounds} {kind:<4} {res['decode_tok_s']:8.1f} tok/s  "
                f"first token {res['ttft_s'] * 1e3:6.1f} ms  rss {res['rss_mb']:.0f} MB")
    out = {"config": config, "batch": batch}
    for kind, results in runs.items():
        out[kind] = {"tok_s": median([r["decode_tok_s"] for r in results]),
                     "ttft_ms": 1e3 * median([r["ttft_s"] for r in results]),
                     "rss_mb": max(r["rss_mb"] for r in results)}
    return out


def table(results: list[dict], threads: int, new_tokens: int) -> str:
    rows = []
    for r in results:
        o, h = r["ours"], r["hf"]
        rows.append([r["config"], r["batch"], f"{o['tok_s']:,.1f}", f"{h['tok_s']:,.1f}", f"{o['tok_s'] / h['tok_s']:.2f}x",
                     f"{o['ttft_ms']:,.1f}", f"{h['ttft_ms']:,.1f}", f"{o['rss_mb']:,.0f}", f"{h['rss_mb']:,.0f}"])
    headers = ["config", "batch", "ours tok/s", "hf generate tok/s", "ours/hf", "ours first token ms",
               "hf first token ms", "ours RSS MB", "hf RSS MB"]
    return (f"Greedy generation, float32, {threads} threads, prompts of {PROMPT} tokens (8 mixed: 8 to 64), "
            f"{new_tokens} new tokens (tokens/s summed over the batch, after the first token; medians over "
            f"processes)\n\n"
            + markdown_table(headers, rows))


def main(quick: bool = False, configs: list[str] | None = None, threads: int = 2, log=print) -> str:
    configs = configs or (["demo"] if quick else list(CONFIGS))
    new_tokens, rounds = (32, 1) if quick else (64, 2)
    results = [bench(c, b, new_tokens, threads, rounds, log) for c in configs for b in BATCHES]
    return table(results, threads, new_tokens)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=6, metavar=("KIND", "CONFIG", "BATCH", "NEW", "THREADS", "ROUNDS"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        kind, config, batch, new, threads, rounds = args.worker
        emit(worker(kind, config, batch, int(new), int(threads), int(rounds)))
    else:
        print(main(args.quick, args.configs, args.threads))


if __name__ == "__main__":
    cli()
