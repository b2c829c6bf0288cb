"""`python -m bench [--quick] [--only train|generate|data|eval|lora|dpo|rollout|longctx|quant|export|serve]`: every benchmark in turn, then one report of all tables.

The long-context table (bench/longctx.py: fine-tunes a demo run, ~30 min), the quantization table
(bench/quant.py: pretrains the original preset briefly, ~1.5 h) and the GGUF/llama.cpp table
(bench/export.py: needs llama-cpp-python, compiled from source by `make bench`) and the serving
table (bench/serve.py: a server under load, ~10 min) run only when asked by name.

This process only starts the measurements and prints; it never imports torch or a tokenizer, so
it stays small: a child started from it counts its parent's memory in ru_maxrss (Linux keeps the
high-water mark across exec), and each measurement's peak RSS should be its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version

from bench import data_prep, generate_vs_hf, train_vs_hf


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions; the training benchmark runs the demo config only")
    p.add_argument("--only", choices=["train", "generate", "data", "eval", "lora", "dpo", "rollout", "longctx", "quant",
                                        "export", "serve"],
                   help="run one benchmark (longctx runs only when named: it needs the demo's run and ~30 min)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the benchmarks that use torch")
    args = p.parse_args()

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  progress, kept out of the report
    started = time.perf_counter()
    tables = []
    if args.only in (None, "train"):
        log("training step: ours vs transformers LlamaForCausalLM")
        tables.append(train_vs_hf.main(quick=args.quick, threads=args.threads, log=log))
    if args.only in (None, "generate"):
        log("generation: ours vs transformers generate")
        tables.append(generate_vs_hf.main(quick=args.quick, threads=args.threads, log=log))
    if args.only in (None, "data"):
        log("data preparation")
        tables.append(data_prep.main(quick=args.quick, log=log))
    if args.only in (None, "eval"):
        log("multiple choice: ours vs lm-evaluation-harness")
        tables.append(_in_child("bench.eval_vs_lmeval", "--threads", str(args.threads),
                                *(["--shots", "0"] if args.quick else [])))
    if args.only in (None, "lora"):
        log("LoRA fine-tuning step: ours vs PEFT")
        tables.append(_in_child("bench.lora_vs_peft", "--threads", str(args.threads),
                                *(["--quick"] if args.quick else [])))
    if args.only in (None, "dpo"):
        log("DPO training step: ours vs TRL's DPOTrainer")
        tables.append(_in_child("bench.dpo_vs_trl", "--threads", str(args.threads),
                                *(["--quick"] if args.quick else [])))
    if args.only in (None, "rollout"):
        log("GRPO rollout generation: ours vs transformers generate")
        tables.append(_in_child("bench.rollout_vs_hf", "--threads", str(args.threads),
                                *(["--quick"] if args.quick else [])))
    if args.only == "longctx":
        log("long context: perplexity by length for every RoPE scaling, S2-Attn against full attention")
        tables.append(_in_child("bench.longctx", "--threads", str(args.threads), *(["--quick"] if args.quick else [])))
    if args.only == "quant":
        log("quantization: size, perplexity and decoding speed per method, torchao as the peer")
        tables.append(_in_child("bench.quant", "--threads", str(args.threads), *(["--quick"] if args.quick else [])))
    if args.only == "export":
        log("GGUF export: sizes, llama.cpp's agreement with us and its decoding speed next to ours")
        tables.append(_in_child("bench.export", "--threads", str(args.threads)))
    if args.only == "serve":
        log("serving: throughput and latency under concurrent clients, against one request at a time")
        tables.append(_in_child("bench.serve", "--threads", str(args.threads)))
    print(f"## Benchmarks ({platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {version('torch')}, transformers {version('transformers')}, "
          f"{'quick' if args.quick else 'full'} run, {time.perf_counter() - started:.0f} s)\n")
    print("\n\n".join(tables))


def _in_child(module: str, *args: str) -> str:
    """A benchmark that prints its own table, run in a child (this process stays free of torch)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"### {module}: not run\n\n{(proc.stderr or proc.stdout).strip().splitlines()[-1]}"
    return proc.stdout.strip()


if __name__ == "__main__":
    main()
