"""Long context: perplexity by context length for every RoPE scaling, before and after a short
fine-tune at a longer length, and LongLoRA's shifted sparse attention against full attention.

1. Without fine-tuning: the checkpoint (trained at L positions) scored by `babyllama eval ppl` at
   every --lengths value with no scaling, linear, ntk, dynamic-ntk, yarn and clex (its untrained
   ODE, which is NTK scaling at the current length), each with factor max(lengths) / L.
2. Fine-tunes at --seq-len (1024) with `babyllama pretrain --init CKPT --seq-len ...` on the same
   data, the same steps, batch and seed: none (positions simply extended), yarn (factor
   seq-len / L, every weight), LongLoRA (linear interpolation, S2-Attn in groups of a quarter of
   the length, LoRA rank 8 on every projection plus norms and embeddings), clex (factor
   max(lengths) / L, every weight and the ODE). Each is then scored like the rows of 1.
3. S2-Attn against full attention: the LongLoRA training step (LoRA + norms + embeddings, AdamW)
   on random tokens at 1024 and 2048 positions, each measurement in its own process: median step
   time and the process's peak RSS. For the demo model and the `original` preset's shape.

Writes longctx.json (kind "longctx": `babyllama report` shows it with the figure), longctx.md
and longctx.png into --out (default: the checkpoint run's eval/ directory).

    python -m bench.longctx [--ckpt runs/demo/pretrain] [--data runs/demo/data] [--steps 150] [--quick]
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

SCALINGS = ("none", "linear", "ntk", "dynamic-ntk", "yarn", "clex")
S2_SHAPES = {"demo": None,  # the checkpoint's own shape
             "original": {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "vocab_size": 8192}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- 1 and 2: perplexity tables -------------------------------------------------------------------

def score(ckpt: str, data: str, lengths: list[int], max_tokens: int, batch: int, out: Path,
          rope=None) -> tuple[dict[str, float], dict]:
    """({length: perplexity}, the whole `eval ppl` result, also written to `out`)."""
    from babyllama.eval.perplexity import PerplexityConfig, perplexity

    result = perplexity(PerplexityConfig(ckpt=ckpt, data=[data], lengths=lengths, max_tokens=max_tokens,
                                         batch_size=batch, out=str(out), rope=rope, progress=False))
    return {str(r["length"]): r["perplexity"] for r in result["results"]}, result


def fine_tunes(seq_len: int, trained: int, far: int) -> dict[str, list[str]]:
    """name -> the flags of its `babyllama pretrain --init` run."""
    return {
        "none": [],
        "yarn": ["--rope-scaling", "yarn", "--rope-factor", f"{seq_len / trained:g}"],
        "longlora": ["--rope-scaling", "linear", "--rope-factor", f"{seq_len / trained:g}", "--lora", "--s2-attn"],
        "clex": ["--rope-scaling", "clex", "--rope-factor", f"{far / trained:g}"],
    }


def run_fine_tune(name: str, flags: list[str], args) -> dict:
    run = Path(args.runs) / name
    lr = "2e-3" if "--lora" in flags else "1e-3"
    cmd = [sys.executable, "-m", "babyllama", "pretrain", "--init", args.ckpt, "--config",
           str(Path(args.ckpt) / "run_config.toml"), "--data", args.data, "--out", str(run), "--overwrite",
           "--seq-len", str(args.seq_len), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--lr", lr, "--set", "train.min_lr=1e-4", "--set", f"train.warmup_steps={max(1, args.steps // 10)}",
           "--set", f"train.eval_interval={args.steps}", "--set", "train.eval_batches=4",
           "--set", f"train.ckpt_interval={args.steps}", "--device", "cpu", "--seed", "1", *flags]
    log(f"fine-tune {name}: {' '.join(cmd[3:])}")
    started = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fine-tune {name} failed:\n{proc.stderr[-3000:]}")
    return {"run": str(run), "lr": float(lr), "seconds": time.perf_counter() - started}


# --- 3: S2-Attn step time and memory ---------------------------------------------------------------

def s2_worker(ckpt: str, shape: str, length: int, group: int, threads: int, steps: int) -> dict:
    import dataclasses

    import torch

    import babyllama.checkpoint as ckpt_io
    from babyllama.adapters.lora import LoRA
    from babyllama.model import Llama
    from babyllama.transforms import apply_transforms
    from babyllama.train.s2attn import apply_s2_attn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ckpt_io.read_model_config(ckpt_io.find_checkpoint(ckpt))
    if S2_SHAPES[shape]:
        cfg = dataclasses.replace(cfg, **S2_SHAPES[shape], hidden_dim=0)
    cfg = cfg.with_rope_scaling("linear", length / cfg.max_seq_len, max_seq_len=length)
    model = Llama(cfg)
    apply_transforms(model, [LoRA(train=("norms", "embeddings"))])
    if group:
        apply_s2_attn(model, group)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = torch.randint(cfg.vocab_size, (1, length + 1))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = model(batch[:, :-1], batch[:, 1:]) / length
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return {"step_s": median(times), "tokens_per_s": length / median(times), "peak_mb": peak_rss_mb(),
            "params_M": cfg.num_params() / 1e6}


def s2_table(args) -> list[dict]:
    rows = []
    for shape in args.s2_shapes:
        for length in args.s2_lengths:
            for group in (0, length // 4):
                log(f"S2-Attn timing: {shape}, {length} positions, {'full attention' if not group else f'groups of {group}'}")
                r = run_worker("bench.longctx", args.ckpt, shape, str(length), str(group), str(args.threads),
                               str(args.s2_steps))
                rows.append({"shape": shape, "length": length, "attention": "S2-Attn" if group else "full",
                             "group": group or None, **r})
    return rows


# --- the figure and the tables ---------------------------------------------------------------------

def draw(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    lengths = result["lengths"]
    for i, stage in enumerate(("no fine-tuning", f"fine-tuned at {result['seq_len']}")):
        ax = fig.add_subplot(1, 2, i + 1)
        for row in (r for r in result["rows"] if r["stage"] == stage):
            ax.plot(lengths, [row["perplexity"][str(n)] for n in lengths], marker="o", label=row["method"])
        ax.axvline(result["trained_length"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(stage)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def tables(result: dict) -> str:
    lengths = result["lengths"]
    out = [f"Perplexity by context length ({result['stream_tokens']:,} tokens of {', '.join(result['data'])}, "
           f"the same at every length; trained at {result['trained_length']}; * past it). {result['machine']}.", ""]
    headers = ["method", "fine-tuned"] + [f"{n}{' *' if n > result['trained_length'] else ''}" for n in lengths]
    out.append(markdown_table(headers, [[r["method"], r["stage"]] + [f"{r['perplexity'][str(n)]:.1f}" for n in lengths]
                                        for r in result["rows"]]))
    out += ["", result["finetune_note"], ""]
    if result.get("s2"):
        out.append(markdown_table(["model", "length", "attention", "step (s)", "tokens/s", "peak RSS (MB)"],
                                  [[r["shape"], r["length"], r["attention"] + (f" (G={r['group']})" if r["group"] else ""),
                                    f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_mb']:,.0f}"]
                                   for r in result["s2"]]))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.longctx", description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=6, metavar=("CKPT", "SHAPE", "LENGTH", "GROUP", "THREADS", "STEPS"))
    p.add_argument("--ckpt", default="runs/demo/pretrain", help="a run pretrained at a short length (the demo's)")
    p.add_argument("--data", default="runs/demo/data", help="its pretraining dataset (the val split is scored)")
    p.add_argument("--out", help="where the table and figure go (default: CKPT/eval)")
    p.add_argument("--runs", help="where the fine-tuned runs go (default: longctx/ beside CKPT)")
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--max-tokens", type=int, default=32_768, help="tokens scored at every length")
    p.add_argument("--seq-len", type=int, default=1024, help="length of the fine-tunes")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each fine-tune")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--s2-lengths", default="1024,2048")
    p.add_argument("--s2-shapes", nargs="+", default=list(S2_SHAPES), choices=list(S2_SHAPES))
    p.add_argument("--s2-steps", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["scalings", "finetune", "s2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 fine-tune steps, 4,096 tokens")
    args = p.parse_args()
    if args.worker:
        ckpt, shape, length, group, threads, steps = args.worker
        emit(s2_worker(ckpt, shape, int(length), int(group), int(threads), int(steps)))
        return
    if args.quick:
        args.steps, args.max_tokens, args.s2_steps = 3, 4096, 1
    args.s2_lengths = [int(n) for n in args.s2_lengths.split(",")]
    # first, while this process has not imported torch: a worker's ru_maxrss starts from its parent's RSS
    s2 = s2_table(args) if "s2" not in args.skip else None
    import torch

    from babyllama.checkpoint import find_checkpoint, read_model_config
    from babyllama.config import RopeScaling
    from babyllama.machine import cpu_model

    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    trained = read_model_config(find_checkpoint(args.ckpt)).trained_len
    far = max(lengths)
    out = Path(args.out or Path(args.ckpt) / "eval")
    args.runs = args.runs or str(Path(args.ckpt).resolve().parent / "longctx")
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} CPUs), {args.threads} threads, float32"
    result = {"kind": "longctx", "checkpoint": str(find_checkpoint(args.ckpt)), "data": [args.data],
              "trained_length": trained, "lengths": lengths, "seq_len": args.seq_len, "machine": machine,
              "rows": [], "s2": []}
    previous = out / "longctx.json"
    if previous.is_file() and args.skip:  # keep the parts not measured again
        old = json.loads(previous.read_text(encoding="utf-8"))
        result["rows"] = [r for r in old.get("rows", []) if
                          ("scalings" in args.skip and r["stage"] == "no fine-tuning") or
                          ("finetune" in args.skip and r["stage"] != "no fine-tuning")]
        result["s2"] = old.get("s2", []) if "s2" in args.skip else []
        for key in ("stream_tokens", "finetune_note"):
            if key in old:
                result[key] = old[key]
    if "scalings" not in args.skip:
        for kind in SCALINGS:
            log(f"perplexity without fine-tuning: {kind}")
            rope = None if kind == "none" else RopeScaling(kind, far / trained)
            ppl, full = score(args.ckpt, args.data, lengths, args.max_tokens, args.batch_size,
                              Path(args.runs) / f"ppl-base-{kind}.json", rope)
            result["stream_tokens"] = full["stream_tokens"]
            result["rows"].append({"method": kind if kind == "none" else f"{kind} x{far / trained:g}",
                                   "stage": "no fine-tuning", "perplexity": ppl})
    if "finetune" not in args.skip:
        runs = fine_tunes(args.seq_len, trained, far)
        note = []
        for name, flags in runs.items():
            info = run_fine_tune(name, flags, args)
            log(f"perplexity after fine-tuning: {name}")
            ppl, full = score(info["run"], args.data, lengths, args.max_tokens, args.batch_size,
                              Path(info["run"]) / "eval" / "ppl-data.json")
            scaling = full["rope_scaling"]
            label = name if scaling["kind"] == "none" else \
                f"{name} ({scaling['kind']} x{scaling['factor']:g})" if name != scaling["kind"] else \
                f"{name} x{scaling['factor']:g}"
            result["rows"].append({"method": label, "stage": f"fine-tuned at {args.seq_len}", "perplexity": ppl,
                                   "seconds": info["seconds"], "lr": info["lr"], "run": info["run"]})
            note.append(f"{name} {info['seconds'] / 60:.1f} min (lr {info['lr']:g})")
        result["finetune_note"] = (f"each {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
                                   f"({args.steps * args.batch_size * args.seq_len:,} tokens), warm-up "
                                   f"{max(1, args.steps // 10)}, cosine to 1e-4: " + "; ".join(note))
    if s2 is not None:
        result["s2"] = s2
    png = out / "longctx.png"
    draw(result, png)
    result["image"] = png.name  # beside the JSON (the report looks there)
    from babyllama.outputs import write_text_atomic

    write_text_atomic(out / "longctx.json", json.dumps(result, indent=2, ensure_ascii=False))
    text = tables(result)
    write_text_atomic(out / "longctx.md", text + "\n")
    print(text)
    log(f"-> {out / 'longctx.json'}, {png}")


if __name__ == "__main__":
    main()
