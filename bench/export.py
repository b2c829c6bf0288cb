"""GGUF export against llama.cpp: file sizes per type, llama.cpp's agreement with us (token ids and
greedy tokens) and its batch-1 decoding speed next to ours, one model, one machine, one run.

The model: the `original` preset (58.5M parameters, ChatGLM2's 64,794-token tokenizer) pretrained by
bench/quant.py when its run exists (runs/bench/quant/original), else the demo's SFT run (our own
tokenizer); `--ckpt` picks another. Each type is written by `babyllama export --format gguf`.

llama.cpp runs through `llama-cpp-python` (`pip install --no-binary llama-cpp-python
llama-cpp-python`: it compiles llama.cpp from its source package, about 12 minutes on 2 cores).

- ids: every text of a set (People's Daily paragraphs, reviews, and awkward strings: full-width
  punctuation, digits, emoji, rare characters, whitespace runs) tokenized by llama.cpp from the GGUF
  vocabulary, against our tokenizer;
- greedy: 64 new tokens after each of 8 prompts (an end-of-text then a news paragraph's first 24
  tokens), llama.cpp with top_k=1 and no repetition penalty, against our float32 model's greedy
  tokens; "agree" counts prompts whose 64 tokens are all equal, "prefix" the mean length of the
  common start;
- speed: batch-1 decoding tokens/s after a 32-token prompt (median of 3), llama.cpp on the file
  against our Engine (decoding layout, compiled step) on the checkpoint (float32, and the 8-bit and
  4-bit RTN runs of bench/quant.py when present), same thread count.

    python -m bench.export [--ckpt RUN] [--threads N] [--texts N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, emit, markdown_table, median, peak_rss_mb, run_worker

OUT = ROOT / "runs" / "bench" / "export"
TYPES = ("f32", "f16", "q8_0", "q4_0")
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 24, 64
SPEED_PROMPT = 32
AWKWARD = ["，。！？：；“”‘’（）【】《》……——", "ＡＢＣ１２３ａｂｃ　全角", "2026年11月30日，3.1415926元，第12345号",
           "😀👍🏽🇨🇳 表情", "𠀀𪚥𰻞 生僻字", "a  b   c\t\td\n\n\ne   ", "   前导空格", "末尾空格   ", " ",
           "Hello, World! It's 100% ok.", "混合English和中文123abc"]


def default_ckpt() -> Path:
    for run in (ROOT / "runs/bench/quant/original", ROOT / "runs/demo/sft"):
        if (run / "checkpoints").is_dir():
            return run
    sys.exit("no model to export: run `make demo` (or `python -m bench.quant`) first, or pass --ckpt")


def texts(n: int) -> list[str]:
    from babyllama.corpus.readers import iter_documents
    from babyllama.data.builtin import peoples_daily_file, review_files

    news = list(itertools.islice(iter_documents(peoples_daily_file(), "peoples_daily"), n // 2))
    with open(review_files()["negative"], encoding="utf-8") as f:
        reviews = [line.strip() for line in itertools.islice(f, n // 2)]
    return news + reviews + AWKWARD


def prompts(tokenizer) -> list[list[int]]:
    news = [t for t in texts(200) if len(tokenizer.encode(t)) >= PROMPT_LEN]
    return [[tokenizer.eos_id] + tokenizer.encode(t)[:PROMPT_LEN] for t in news[:PROMPTS]]


def worker_ours(run: str, threads: int) -> dict:
    """Our greedy tokens (float32, plain forward) and the batch-1 decoding speed of `run`."""
    import torch

    from babyllama.infer.engine import Engine
    from babyllama.infer.sampling import SamplingConfig

    torch.set_num_threads(threads)
    engine = Engine.load(run, device="cpu", dtype="float32")
    greedy = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    tokens = [engine.generate([p], NEW_TOKENS, greedy)[0] for p in prompts(engine.tokenizer)]
    ids = [engine.tokenizer.encode(t) for t in texts(400)]
    speed_prompt = torch.randint(engine.model.config.vocab_size, (SPEED_PROMPT,),
                                 generator=torch.Generator().manual_seed(1)).tolist()

    def decode() -> float:
        stream = engine.stream([speed_prompt], NEW_TOKENS, greedy)
        next(stream)
        t = time.perf_counter()
        sum(1 for _ in stream)
        return time.perf_counter() - t

    decode()
    tok_s = (NEW_TOKENS - 1) / median([decode() for _ in range(3)])
    return {"tokens": tokens, "ids": ids, "tok_s": tok_s, "rss_mb": peak_rss_mb(), "speed_prompt": speed_prompt}


def worker_llamacpp(gguf: str, run: str, threads: int) -> dict:
    import llama_cpp

    from babyllama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(run) / "tokenizer")
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts(400)]

    def greedy(prompt: list[int], n: int) -> list[int]:
        out = []
        for tid in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tid)
            if len(out) == n:
                return out
        return out

    tokens = [greedy(p, NEW_TOKENS) for p in prompts(tokenizer)]
    speed_prompt = json.loads(os.environ["SPEED_PROMPT"])

    def decode() -> float:
        stream = llm.generate(speed_prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        next(stream)
        t = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            next(stream)
        return time.perf_counter() - t

    decode()
    tok_s = (NEW_TOKENS - 1) / median([decode() for _ in range(3)])
    llm.close()
    return {"tokens": tokens, "ids": ids, "tok_s": tok_s, "rss_mb": peak_rss_mb()}


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return sum(a == b for a, b in zip(ours, theirs)), sum(common(a, b) for a, b in zip(ours, theirs)) / len(ours)


def main(ckpt: Path, threads: int) -> str:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    OUT.mkdir(parents=True, exist_ok=True)
    sizes, seconds = {}, {}
    for t in TYPES:
        path = OUT / f"{ckpt.name}-{t}.gguf"
        log(f"export {t} -> {path}")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "babyllama", "export", "--ckpt", str(ckpt), "--format", "gguf",
                        "--type", t, "--out", str(path), "--overwrite"], cwd=ROOT, check=True, capture_output=True)
        seconds[t], sizes[t] = time.perf_counter() - start, path.stat().st_size / 2**20
    log("ours: greedy tokens, ids, speed")
    ours = run_worker("bench.export", "ours", str(ckpt), str(threads))
    env = {**os.environ, "SPEED_PROMPT": json.dumps(ours["speed_prompt"])}
    rows = []
    for t in TYPES:
        log(f"llama.cpp {t}")
        proc = subprocess.run([sys.executable, "-m", "bench.export", "--worker", "llamacpp",
                               str(OUT / f"{ckpt.name}-{t}.gguf"), str(ckpt), str(threads)],
                              cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        same_ids = sum(a == b for a, b in zip(ours["ids"], r["ids"]))
        agree, prefix = agreement(ours["tokens"], r["tokens"])
        rows.append([f"llama.cpp {t}", f"{sizes[t]:.1f}", f"{seconds[t]:.0f}", f"{same_ids}/{len(ours['ids'])}",
                     f"{agree}/{PROMPTS}", f"{prefix:.1f}", f"{r['tok_s']:.1f} ({r['tok_s'] / ours['tok_s']:.2f}x)",
                     f"{r['rss_mb']:.0f}"])
    float_file = (ckpt / "checkpoints").glob("step-*/model.safetensors")
    size = next(iter(sorted(float_file)), None)
    rows.insert(0, ["ours float32 (Engine)", f"{size.stat().st_size / 2**20:.1f}" if size else "", "", "", "", "",
                    f"{ours['tok_s']:.1f} (1.00x)", f"{ours['rss_mb']:.0f}"])
    for name in ("rtn_8-bit", "rtn_4-bit_g128"):  # our own quantized runs of the same model, when bench/quant made them
        run = ckpt / name
        if (run / "checkpoints").is_dir():
            log(f"ours {name}")
            q = run_worker("bench.export", "ours", str(run), str(threads))
            rows.insert(1, [f"ours {name} (Engine)", "", "", "", "", "", f"{q['tok_s']:.1f} "
                            f"({q['tok_s'] / ours['tok_s']:.2f}x)", f"{q['rss_mb']:.0f}"])
    head = (f"### GGUF export and llama.cpp ({ckpt}, {platform.machine()}, {threads} threads, "
            f"llama-cpp-python {_version('llama_cpp_python')}, gguf {_version('gguf')})\n\n")
    return head + markdown_table(
        ["", "file MiB", "export s", "same ids (texts)", f"greedy {NEW_TOKENS} equal (prompts)", "common prefix",
         "batch-1 tok/s", "peak RSS MB"], rows)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "ours":
            emit(worker_ours(rest[0], int(rest[1])))
        else:
            emit(worker_llamacpp(rest[0], rest[1], int(rest[2])))
        sys.exit(0)
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, help="the run to export (default: bench/quant's original run, else the demo's)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(main(args.ckpt or default_ckpt(), args.threads))
