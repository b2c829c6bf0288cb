"""Quantization: file size, perplexity and decoding speed per method, one model, one evaluation text, one run.

For each model (the demo's pretrained run from `make demo`, and the `original` preset, 58.5M
parameters with ChatGLM2's 64,794-token vocabulary, pretrained briefly here: enough for relative
figures) every row is a run written by `babyllama quantize` from the same float checkpoint, with
the same calibration text (the training split of the model's own data) and the same held-out text:

- file size of model.safetensors, and against the float32 file (the bf16 row: half the float32
  file, the weights being cast when loaded);
- perplexity at the model's context on the validation split, and its change against float32;
- greedy decoding tokens/s at batch 1 and batch 8 (32-token prompts, 64 new tokens), through the
  Engine every stage uses (`Engine.load`: the decoding layout, the compiled step), peak RSS.

The peer is torchao (`pip install torchao`, in `make bench`): its int8 weight-only quantization
(`Int8WeightOnlyConfig`) applied to the same float model, run through the same Engine (its tensor
subclasses replace the weights, so our decoding layout is not applied to it). torchao 0.18's int4
weight-only has no CPU kernel here (its packings ask for CUDA or the `mslk` package; measured
2026-11-30), so it has no row.

Each measurement runs in its own interpreter (its own peak RSS); decoding speed is the median of 3
rounds. The machine is shared and noisy: read the ratios, measured in the same run.

BitNet's row is a run trained from the float one for --qat-steps steps of quantization-aware
training (`pretrain --init FLOAT --bitnet`, lr 1e-3) on the same training data, then packed.

    python -m bench.quant [--quick] [--configs demo original] [--threads N] [--steps N] [--qat-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, emit, markdown_table, median, peak_rss_mb, run_worker

WORK = ROOT / "runs" / "bench" / "quant"
DEMO_RUN, DEMO_DATA = ROOT / "runs" / "demo" / "pretrain", ROOT / "runs" / "demo" / "data"
CHATGLM = ROOT.parent / "shared" / "data" / "tokenizers" / "chatglm2"
PROMPT, NEW_TOKENS = 32, 64

# (row name, `babyllama quantize` flags): None is the float model itself
METHODS = [
    ("float32", None),
    ("bf16 weights", "bf16"),
    ("int8 (LLM.int8 outliers)", ["--method", "int8"]),
    ("rtn 8-bit", ["--method", "rtn", "--bits", "8", "--group-size", "0", "--sym"]),
    ("rtn 4-bit g128", ["--method", "rtn", "--bits", "4", "--group-size", "128"]),
    ("gptq 4-bit g128", ["--method", "gptq", "--bits", "4", "--group-size", "128"]),
    ("gptq 4-bit g128 act-order", ["--method", "gptq", "--bits", "4", "--group-size", "128", "--act-order"]),
    ("awq 4-bit g128", ["--method", "awq", "--bits", "4", "--group-size", "128"]),
    ("rtn 4-bit g128, float head", ["--method", "rtn", "--bits", "4", "--group-size", "128", "--no-head"]),
    ("gptq 3-bit g128", ["--method", "gptq", "--bits", "3", "--group-size", "128"]),
    ("rtn 2-bit g32", ["--method", "rtn", "--bits", "2", "--group-size", "32"]),
    ("gptq 2-bit g32", ["--method", "gptq", "--bits", "2", "--group-size", "32"]),
    ("bitnet b1.58 (QAT, 2-bit)", "bitnet"),
    ("torchao int8 weight-only", "torchao-int8"),
]
QUICK = {"float32", "bf16 weights", "int8 (LLM.int8 outliers)", "rtn 8-bit", "rtn 4-bit g128", "gptq 4-bit g128",
         "awq 4-bit g128", "rtn 4-bit g128, float head", "bitnet b1.58 (QAT, 2-bit)", "torchao int8 weight-only"}


def babyllama(*args: str, log=print) -> None:
    cmd = [sys.executable, "-m", "babyllama", *args]
    log("  $ babyllama " + " ".join(args))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def original_run(steps: int, log) -> tuple[Path, Path]:
    """The original preset, pretrained `steps` steps on the built-in corpus in ChatGLM2's tokenizer."""
    run, data = WORK / "original-float", WORK / "original-data"  # the quantized runs go in WORK / "original"
    if not (data / "manifest.json").is_file():
        if not (CHATGLM / "tokenizer.model").is_file():
            raise SystemExit(f"{CHATGLM} is absent: the original preset's tokenizer comes from ../shared/data")
        from babyllama.data.builtin import write_builtin_corpus

        corpus = write_builtin_corpus(WORK / "corpus")
        babyllama("data", "pretrain", "--input", corpus["peoples_daily"], corpus["reviews"] + "::text",
                  "--tokenizer", str(CHATGLM), "--out", str(data), log=log)
    if not (run / "checkpoints" / "latest").is_file():
        babyllama("pretrain", "--preset", "original", "--data", str(data), "--out", str(run), "--max-steps",
                  str(steps), "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--set",
                  f"train.eval_interval={steps}", "--set", "train.eval_batches=4", "--set", "train.warmup_steps=20",
                  "--overwrite", log=log)
    return run, data


def bitnet_run(config: str, float_run: Path, data: Path, steps: int, log) -> Path:
    """BitNet b1.58: `steps` steps of quantization-aware training from the float run, then packed."""
    qat, out = WORK / config / "bitnet-qat", WORK / config / "bitnet"
    if not (qat / "checkpoints" / "latest").is_file():
        babyllama("pretrain", "--init", str(float_run), "--config", str(float_run / "run_config.toml"), "--bitnet",
                  "--data", str(data), "--out", str(qat), "--max-steps", str(steps), "--batch-size", "4",
                  "--grad-accum", "1", "--lr", "1e-3", "--set", "train.warmup_steps=10",
                  "--set", f"train.eval_interval={steps}", "--set", "train.eval_batches=4",
                  "--overwrite", log=log)
    if not (out / "quantization.json").is_file():
        babyllama("quantize", "--ckpt", str(qat), "--out", str(out), "--method", "bitnet", "--overwrite", log=log)
    return out


def quantized_run(config: str, name: str, flags: list[str], float_run: Path, data: Path, log) -> Path:
    out = WORK / config / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace(".", "")
    if not (out / "quantization.json").is_file():
        babyllama("quantize", "--ckpt", str(float_run), "--out", str(out), *flags, "--calib", str(data),
                  "--calib-samples", "128", "--overwrite", log=log)
    return out


# --- workers (each in a fresh interpreter) ------------------------------------------------------------

def _torchao_int8(model):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def _load(run: str, kind: str):
    """(model ready to decode, tokenizer) for a row kind: plain (float or quantized run), bf16, torchao-int8."""
    import torch

    from babyllama.eval.perplexity import load_for_eval
    from babyllama.infer.decode import prepare_for_decoding

    model, tokenizer, _ = load_for_eval(run, "cpu", "bfloat16" if kind == "bf16" else "float32")
    if kind == "torchao-int8":
        return _torchao_int8(model), tokenizer
    with torch.no_grad():
        return prepare_for_decoding(model), tokenizer


def worker_ppl(run: str, kind: str, data: str, threads: int) -> dict:
    import torch

    from babyllama.eval.perplexity import score_stream, token_stream

    torch.set_num_threads(threads)
    model, tokenizer = _load(run, kind)
    stream = token_stream([data], tokenizer, "val", 32_768)
    length = model.config.max_seq_len
    if kind == "torchao-int8":  # its weights are tensor subclasses our fused head + loss cannot take: full logits
        model.output.loss_weight = lambda: None
        model.output.__class__ = type("TorchaoHead", (type(model.output),), {})
    nats, count = score_stream(model, stream, length, length // 2, batch_size=8)
    import math

    return {"ppl": math.exp(nats / count), "tokens": count}


def worker_speed(run: str, kind: str, batch: int, threads: int) -> dict:
    import torch

    from babyllama.infer.engine import Engine
    from babyllama.infer.sampling import SamplingConfig

    torch.set_num_threads(threads)
    model, _ = _load(run, kind)
    engine = Engine(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(model.config.vocab_size, (PROMPT,), generator=g).tolist() for _ in range(batch)]
    greedy = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)

    def decode(n: int) -> float:
        stream = engine.stream(prompts, n, greedy)
        next(stream)
        t = time.perf_counter()
        assert 1 + sum(1 for _ in stream) == n
        return time.perf_counter() - t

    decode(4)
    times = [decode(NEW_TOKENS) for _ in range(3)]
    return {"tok_s": batch * (NEW_TOKENS - 1) / median(times), "rss_mb": peak_rss_mb()}


# --- the table -----------------------------------------------------------------------------------------

def measure(config: str, float_run: Path, data: Path, threads: int, quick: bool, qat_steps: int, log,
            only: list[str] | None = None) -> list[dict]:
    rows = []
    float_file = (float_run / "checkpoints" / (float_run / "checkpoints" / "latest").read_text().strip()
                  / "model.safetensors").stat().st_size
    for name, flags in METHODS:
        if (quick and name not in QUICK) or (only and name not in only):
            continue
        if isinstance(flags, list) or flags == "bitnet":
            run = bitnet_run(config, float_run, data, qat_steps, log) if flags == "bitnet" else \
                quantized_run(config, name, flags, float_run, data, log)
            kind = "plain"
            manifest = json.loads((run / "quantization.json").read_text())
            size = manifest["file_bytes"]
        else:
            run, kind = float_run, flags or "plain"
            manifest, size = {}, float_file // 2 if kind == "bf16" else float_file
        try:
            ppl = run_worker("bench.quant", "ppl", str(run), kind, str(data), str(threads))
            speed = {b: run_worker("bench.quant", "speed", str(run), kind, str(b), str(threads)) for b in (1, 8)}
        except RuntimeError as e:
            log(f"  {name}: failed ({str(e).splitlines()[-1][:200]})")
            continue
        row = {"config": config, "method": name, "bytes": size, "ppl": ppl["ppl"], "tok_s_1": speed[1]["tok_s"],
               "tok_s_8": speed[8]["tok_s"], "rss_mb": max(s["rss_mb"] for s in speed.values()),
               "error_vs_rtn": manifest.get("mean_error_vs_rtn"), "seconds": manifest.get("seconds")}
        rows.append(row)
        log(f"  {config} {name:<28} {size / 2**20:7.1f} MiB  ppl {row['ppl']:8.2f}  "
            f"{row['tok_s_1']:6.1f} / {row['tok_s_8']:6.1f} tok/s  rss {row['rss_mb']:.0f} MB")
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        base = next(r for r in mine if r["method"] == "float32")
        lines = [[r["method"], f"{r['bytes'] / 2**20:.1f} ({r['bytes'] / base['bytes']:.0%})",
                  f"{r['ppl']:.2f} ({(r['ppl'] / base['ppl'] - 1) * 100:+.1f}%)",
                  f"{r['tok_s_1']:.1f} ({r['tok_s_1'] / base['tok_s_1']:.2f}x)",
                  f"{r['tok_s_8']:.1f} ({r['tok_s_8'] / base['tok_s_8']:.2f}x)", f"{r['rss_mb']:.0f}",
                  f"{r['error_vs_rtn']:.3g}" if r["error_vs_rtn"] else "",
                  f"{r['seconds']:.0f}" if r["seconds"] is not None else ""] for r in mine]
        out.append(f"**{config}**\n\n" + markdown_table(
            ["method", "file MiB (of float32)", "perplexity (change)", "batch-1 tok/s", "batch-8 tok/s",
             "peak RSS MB", "layer error vs RTN", "quantize s"], lines))
    return "\n\n".join(out)


def main(quick: bool = False, configs=("demo", "original"), threads: int = 2, steps: int = 300, qat_steps: int = 200,
         log=print, only: list[str] | None = None) -> str:
    rows = []
    for config in configs:
        if config == "demo":
            if not (DEMO_RUN / "checkpoints" / "latest").is_file():
                raise SystemExit(f"{DEMO_RUN} is absent: run `make demo` first")
            float_run, data = DEMO_RUN, DEMO_DATA
        else:
            float_run, data = original_run(steps, log)
        rows += measure(config, float_run, data, threads, quick, qat_steps, log, only)
    (WORK / ("results.json" if not only else "results-some.json")).write_text(json.dumps(rows, indent=1))
    cpu = platform.processor() or platform.machine()
    return (f"### Quantization ({cpu}, {threads} threads, {os.cpu_count()} cores)\n\n" + table(rows) +
            "\n\nperplexity: validation split, the model's context, half-overlapping windows; tok/s: greedy, "
            f"{PROMPT}-token prompts, {NEW_TOKENS} new tokens, median of 3; layer error: the geometric mean over layers "
            "of the method's relative output error on held-out calibration rows divided by plain RTN's; torchao quantizes "
            "the float file when it loads it")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, args = sys.argv[2], sys.argv[3:]
        if kind == "ppl":
            emit(worker_ppl(args[0], args[1], args[2], int(args[3])))
        else:
            emit(worker_speed(args[0], args[1], int(args[2]), int(args[3])))
        sys.exit(0)
    p = argparse.ArgumentParser(prog="python -m bench.quant", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the main rows only")
    p.add_argument("--configs", nargs="+", default=["demo", "original"], choices=["demo", "original"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="pretraining steps of the original-preset model")
    p.add_argument("--qat-steps", type=int, default=200, help="BitNet quantization-aware training steps")
    p.add_argument("--rows", nargs="+", metavar="NAME", help="measure only these rows (float32 is always needed "
                                                             "for the ratios)")
    a = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    print(main(a.quick, a.configs, a.threads, a.steps, a.qat_steps, log=lambda m: print(m, file=sys.stderr, flush=True),
               only=a.rows))
