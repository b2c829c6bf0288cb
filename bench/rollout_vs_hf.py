"""GRPO rollout generation speed: our Engine, as `Rollouts.rollout` drives it, against `transformers` `generate`.

One rollout is what align/rl.py's `Rollouts.rollout` generates per batch: 2 prompts x a group
of 8 = 16 rows, each prompt repeated 8 times, sampled at temperature 1 (no top-k, no top-p, no
repetition penalty), one draw per step for the whole batch from the torch generator seeded for
the rollout (`torch.random.fork_rng` + `manual_seed`, as the rollout does). Here the prompts are 32 random token
ids and no stop id ever occurs, so every row generates all 64 new tokens: both sides do the same
work. Random weights (`Llama(ModelConfig(...))`, seed 0), float32, the same threads.

- ours (as GRPO runs it): `Engine(model, None, compile_step=False).generate(rows, 64, samplings)` on
  the plain, trainable model: what a GRPO step does (the headline row);
- ours (decoding layout): the same after `prepare_for_decoding` (infer/decode.py), the inference-only
  layout `Engine.load` uses (GRPO cannot: its policy trains);
- hf generate: the same weights converted by `babyllama.export.hf`, `generate(do_sample=True,
  temperature=1, top_k=0, top_p=1, min_new_tokens=max_new_tokens=64, use_cache=True)`.

Reported: new tokens/s (16 x 64 / the seconds of one rollout: prefill and sampling included), the
time per rollout, ours/hf, peak RSS. Each measurement runs in its own process (fresh allocator, its
own peak RSS); one untimed warm-up rollout first; medians over the timed rollouts and processes.

    python -m bench.rollout_vs_hf [--quick] [--configs demo original] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import emit, markdown_table, median, peak_rss_mb, run_worker

CONFIGS = {
    "demo": dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4, max_seq_len=256),
    "original": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, max_seq_len=256),
}
KINDS = ("ours", "ours-layout", "hf")
LABELS = {"ours": "ours (as GRPO runs it: plain model)", "ours-layout": "ours (decoding layout)",
          "hf": "hf generate"}
PROMPTS, GROUP, PROMPT_LEN = 2, 8, 32
ROWS = PROMPTS * GROUP


def _setup(config: str):
    import torch

    from babyllama.config import ModelConfig
    from babyllama.model import Llama

    torch.manual_seed(0)
    model = Llama(ModelConfig(**CONFIGS[config]))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(model.config.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in range(PROMPTS)]
    rows = [p for p in prompts for _ in range(GROUP)]  # each prompt repeated group-size times, as GRPO does
    return model, rows


def ours(engine, rows, new_tokens: int, seed: int) -> float:
    from babyllama.infer.sampling import SamplingConfig

    import torch

    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        outs = engine.generate(rows, new_tokens, sampling)  # no stop ids: every row runs its whole budget
    seconds = time.perf_counter() - t0
    assert all(len(o) == new_tokens for o in outs), [len(o) for o in outs]
    return seconds


def hf(model, rows, new_tokens: int, seed: int) -> float:
    import torch

    prompt = torch.tensor(rows)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, use_cache=True)
    seconds = time.perf_counter() - t0
    assert out.shape == (len(rows), prompt.shape[1] + new_tokens), out.shape
    return seconds


def worker(kind: str, config: str, new_tokens: int, threads: int, reps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, rows = _setup(config)
    if kind == "hf":
        from babyllama.export.hf import to_hf_model

        model = to_hf_model(model)
        model.generation_config.eos_token_id = None  # no stop: every row generates all its tokens
        run = hf
    else:
        from babyllama.infer.engine import Engine

        if kind == "ours-layout":
            from babyllama.infer.decode import prepare_for_decoding

            model = prepare_for_decoding(model)
        model = Engine(model, None, compile_step=False)  # as Rollouts.rollout builds it
        run = ours
    run(model, rows, new_tokens, seed=10_000)  # warm-up, the full rollout, not timed
    times = [run(model, rows, new_tokens, seed=1_000 * (r + 1)) for r in range(reps)]
    return {"kind": kind, "seconds": median(times), "rss_mb": peak_rss_mb()}


def bench(config: str, new_tokens: int, threads: int, processes: int, reps: int, log=print) -> dict:
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(processes):
        shift = r % len(KINDS)
        for kind in KINDS[shift:] + KINDS[:shift]:  # interleaved, rotated: drift on a shared machine is spread out
            res = run_worker("bench.rollout_vs_hf", kind, config, str(new_tokens), str(threads), str(reps))
            runs[kind].append(res)
            log(f"  {config} process {r + 1}/{processes} {kind:<11} {ROWS * new_tokens / res['seconds']:8.1f} tok/s  "
                f"rollout {res['seconds'] * 1e3:7.1f} ms  rss {res['rss_mb']:.0f} MB")
    out = {"config": config}
    for kind, results in runs.items():
        out[kind] = {"seconds": median([r["seconds"] for r in results]), "rss_mb": max(r["rss_mb"] for r in results)}
    return out


def table(results: list[dict], threads: int, new_tokens: int, load: tuple[float, float]) -> str:
    rows = []
    for r in results:
        h = r["hf"]["seconds"]
        for kind in KINDS:
            s, rss = r[kind]["seconds"], r[kind]["rss_mb"]
            rows.append([r["config"], LABELS[kind], f"{ROWS * new_tokens / s:,.1f}", f"{s * 1e3:,.1f}",
                         f"{h / s:.2f}x", f"{rss:,.0f}"])
    headers = ["config", "generator", "new tokens/s", "ms per rollout", "vs hf generate", "peak RSS MB"]
    return (f"GRPO rollout generation, float32, {threads} threads: {PROMPTS} prompts x group {GROUP} = {ROWS} rows, "
            f"prompts of {PROMPT_LEN} random ids, {new_tokens} new tokens each (temperature 1, no stop); "
            f"tokens/s = {ROWS} x {new_tokens} / seconds per rollout (prefill and sampling included), medians "
            f"over rollouts and processes; 'vs hf generate' = ours tokens/s / hf tokens/s. "
            f"Load average {load[0]:.2f} before, {load[1]:.2f} after, on {os.cpu_count()} CPUs.\n\n"
            + markdown_table(headers, rows))


def main(quick: bool = False, configs: list[str] | None = None, threads: int = 2, log=print) -> str:
    configs = configs or (["demo"] if quick else list(CONFIGS))
    new_tokens = 64
    processes, reps = (1, 3) if quick else (2, 5)
    before = os.getloadavg()[0]
    results = [bench(c, new_tokens, threads, processes, reps, log) for c in configs]
    return table(results, threads, new_tokens, (before, os.getloadavg()[0]))


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=5, metavar=("KIND", "CONFIG", "NEW", "THREADS", "REPS"))
    p.add_argument("--quick", action="store_true", help="demo shape only, one process per generator")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        kind, config, new, threads, reps = args.worker
        emit(worker(kind, config, int(new), int(threads), int(reps)))
    else:
        print(main(args.quick, args.configs, args.threads))


if __name__ == "__main__":
    cli()
