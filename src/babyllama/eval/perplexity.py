"""Perplexity, bits per character and bits per byte, at one or several context lengths.

The text is one token stream, as pretraining saw it (`doc EOS doc EOS ...`): a pretraining
dataset's split (`val` by default), or raw files in any layout `data pretrain` reads, tokenized
here. The same first `max_tokens` of it are scored at every length, so the rows of the table
compare lengths and nothing else.

Sliding windows (the scheme of Hugging Face's perplexity guide): windows of `length` input tokens
start every `stride` tokens; each predicts the targets after the previous window's last, so every
token but the first is scored exactly once, and after the first window with at least
`length - stride` tokens of context. `stride = length` is plain chunked perplexity. Lengths past
the model's trained context extend its rotary tables, scaled as the checkpoint records or as
`rope` (--rope-scaling) says: one command gives a row of the long-context table per scaling.

Bits per character and per byte divide the summed loss (in bits) by the characters and the UTF-8
bytes of the scored text, which do not depend on the tokenizer: runs with different vocabularies
compare on them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from babyllama.config import ConfigError, IGNORE_INDEX, RopeScaling, check_int


@dataclass
class PerplexityConfig:
    ckpt: str  # run directory (its newest good checkpoint) or checkpoint directory
    data: list[str]  # a pretraining dataset directory and/or raw files (FILE or FILE::LAYOUT)
    lengths: list[int] = field(default_factory=list)  # context lengths; empty: the model's max_seq_len
    stride: int | None = None  # None: half of each length
    split: str = "val"  # of a pretraining dataset
    max_tokens: int = 65_536  # of the stream, the same ones at every length
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    layout: str = "auto"  # of raw files
    encoding: str = "utf-8"  # of raw files
    allow_unverified: bool = False
    out: str | None = None  # JSON results; None: RUN/eval/ppl-DATA.json when --ckpt is a run directory
    progress: bool = True
    rope: RopeScaling | None = None  # replaces the checkpoint's RoPE scaling (--rope-scaling ...)

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("--data: give a pretraining dataset directory or text files")
        for length in self.lengths:
            check_int("--lengths", length, 2)
        if self.stride is not None:
            check_int("--stride", self.stride, 1)
            if self.lengths and self.stride > min(self.lengths):
                raise ConfigError(f"--stride {self.stride} is longer than the shortest length "
                                  f"{min(self.lengths)}: tokens between windows would never be scored")
        check_int("--max-tokens", self.max_tokens, 2)
        check_int("--batch-size", self.batch_size, 1)
        if self.split not in ("train", "val"):
            raise ConfigError(f"--split must be train or val, got {self.split!r}")


def token_stream(data: list[str], tokenizer, split: str = "val", max_tokens: int = 65_536, layout: str = "auto",
                 encoding: str = "utf-8") -> np.ndarray:
    """The first `max_tokens` of the text, as ids: a dataset's split, then raw files' documents."""
    from babyllama.data.pretrain import load_manifest

    pieces, total = [], 0
    for spec in data:
        if total >= max_tokens:
            break
        path = Path(spec.split("::")[0])
        if path.is_dir():
            manifest = load_manifest(path)
            if manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
                raise ConfigError(f"{path}: made with tokenizer {manifest['tokenizer']['fingerprint']}, but the "
                                  f"model's is {tokenizer.fingerprint}; give raw text files instead")
            dtype = np.dtype(manifest["dtype"])
            for shard in manifest["splits"][split]["shards"]:
                ids = np.fromfile(path / shard["file"], dtype=dtype, count=max_tokens - total).astype(np.int64)
                pieces.append(ids)
                total += len(ids)
                if total >= max_tokens:
                    break
        else:
            from babyllama.corpus.readers import iter_documents

            for doc in iter_documents(spec, layout, encoding=encoding):
                ids = np.asarray(tokenizer.encode(doc) + [tokenizer.eos_id], dtype=np.int64)
                pieces.append(ids[:max_tokens - total])
                total += len(pieces[-1])
                if total >= max_tokens:
                    break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if len(stream) < 2:
        raise ConfigError(f"{', '.join(data)}: fewer than 2 tokens of text to score")
    return stream


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) per window over a stream of n tokens: the window's inputs
    are stream[begin:end], its targets stream[begin + 1:end + 1], scored from the given target on."""
    out, scored_to, begin = [], 0, 0
    while scored_to < n - 1:
        end = min(begin + length, n - 1)
        out.append((begin, end, scored_to + 1))
        scored_to = end
        begin += stride
    return out


@torch.no_grad()
def score_stream(model, stream: np.ndarray, length: int, stride: int, batch_size: int = 8,
                 progress: bool = False) -> tuple[float, int]:
    """(summed loss in nats, number of scored tokens) of `stream` under sliding windows."""
    from tqdm import tqdm

    device = next(model.buffers()).device
    spans = windows(len(stream), length, stride)
    groups: dict[int, list] = {}  # windows of equal input length go in one batch
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    total, count = 0.0, 0
    bar = tqdm(total=len(spans), disable=not progress, desc=f"perplexity @ {length}", unit="window", leave=False)
    for size, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.tensor(np.stack([stream[b:e] for b, e, _ in chunk]))
            y = torch.tensor(np.stack([stream[b + 1:e + 1] for b, e, _ in chunk]))
            for row, (b, _, first) in enumerate(chunk):
                y[row, :first - b - 1] = IGNORE_INDEX  # targets an earlier window scored
            losses = model(x.to(device), y.to(device), reduction="none")
            total += float(losses.double().sum())
            count += int((y != IGNORE_INDEX).sum())
            bar.update(len(chunk))
    bar.close()
    return total, count


def extend_context(model, length: int) -> None:
    """Let `model` take `length` positions: longer rotary tables with the same scaling (none: the
    angles extrapolate past the trained length)."""
    cfg = model.config
    if length <= cfg.max_seq_len:
        return
    model.rope.extend(length)
    model.config = dataclasses.replace(cfg, max_seq_len=length)


def load_for_eval(ckpt: str, device: str = "auto", dtype: str = "float32", allow_unverified: bool = False,
                  rope=None):
    """(model in eval mode on the device and dtype, its tokenizer, the checkpoint directory); an
    adapter run's adapter is folded into the weights (the same outputs, faster). `rope`
    (config.RopeScaling) replaces the checkpoint's RoPE scaling."""
    from babyllama.checkpoint import load_model
    from babyllama.runtime import inference_dtype, pick_device
    from babyllama.tokenizer import load_tokenizer

    where = pick_device(device)
    model, ckpt_dir = load_model(ckpt, where, allow_unverified=allow_unverified, merge=True, rope=rope)
    model.eval().to(inference_dtype(dtype, where))
    tok_dir = next((d for d in (ckpt_dir / "tokenizer", ckpt_dir.parent.parent / "tokenizer") if d.is_dir()), None)
    if tok_dir is None:
        raise ConfigError(f"{ckpt}: no tokenizer/ directory next to the checkpoint")
    return model, load_tokenizer(tok_dir), ckpt_dir


def perplexity(cfg: PerplexityConfig) -> dict:
    """Score the text at every length; returns (and writes, see `out`) the results."""
    model, tokenizer, ckpt = load_for_eval(cfg.ckpt, cfg.device, cfg.dtype, cfg.allow_unverified, cfg.rope)
    stream = token_stream(cfg.data, tokenizer, cfg.split, cfg.max_tokens, cfg.layout, cfg.encoding)
    text = tokenizer.decode(stream[1:].tolist())  # every token but the first is scored, at any length
    chars, n_bytes = max(len(text), 1), max(len(text.encode("utf-8")), 1)
    trained = model.config.trained_len  # before any RoPE scaling
    rows = []
    for length in cfg.lengths or [trained]:
        stride = cfg.stride or max(1, length // 2)
        extend_context(model, length)
        nats, count = score_stream(model, stream, length, stride, cfg.batch_size, cfg.progress)
        bits = nats / math.log(2)
        rows.append({"length": length, "stride": stride, "beyond_trained": length > trained, "tokens": count,
                     "loss": nats / count, "perplexity": math.exp(nats / count),
                     "bits_per_char": bits / chars, "bits_per_byte": bits / n_bytes})
    mc = model.config
    scaling = {"kind": mc.rope_scaling, "factor": mc.rope_factor, "original_length": trained}
    result = {"kind": "perplexity", "checkpoint": str(ckpt), "data": list(cfg.data), "split": cfg.split,
              "trained_length": trained, "rope_scaling": scaling, "stream_tokens": int(len(stream)),
              "characters": chars, "bytes": n_bytes, "results": rows}
    eval_dir = _run_eval_dir(cfg.ckpt)
    # a scaling chosen here gets its own file: the methods' tables sit side by side
    suffix = "" if cfg.rope is None else f"-rope-{mc.rope_scaling}" + (
        f"{mc.rope_factor:g}" if mc.rope_scaling != "none" else "")
    out = Path(cfg.out) if cfg.out else (eval_dir / f"ppl-{_slug(cfg.data)}{suffix}.json" if eval_dir else None)
    if out is not None:
        from babyllama.outputs import write_text_atomic

        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(result, indent=2, ensure_ascii=False))
        result["written_to"] = str(out)
    return result


def _slug(data: list[str]) -> str:
    """A file name part for what was scored: evaluations of different texts sit side by side."""
    names = "+".join(Path(spec.split("::")[0]).stem for spec in data)
    return re.sub(r"[^\w.+-]", "_", names)[:80] or "text"


def _run_eval_dir(ckpt: str) -> Path | None:
    """RUN/eval for a run directory (or a checkpoint inside one), where the report looks."""
    path = Path(ckpt)
    for run in (path, path.parent.parent):
        if (run / "run.json").is_file():
            return run / "eval"
    return None


def eval_output_path(ckpt: str, out: str | None, kind: str, data: list[str]) -> Path:
    """Where an evaluation writes its JSON: `out`, else RUN/eval/KIND-DATA.json for a run directory
    (an error otherwise, raised before any work)."""
    if out:
        return Path(out)
    eval_dir = _run_eval_dir(ckpt)
    if eval_dir is None:
        raise ConfigError(f"--ckpt {ckpt} is not in a run directory: give --out FILE.json for the results")
    return eval_dir / f"{kind}-{_slug(data)}.json"


def format_table(result: dict) -> str:
    rope = result.get("rope_scaling") or {"kind": "none"}
    scaled = "" if rope["kind"] == "none" else f"; RoPE scaling {rope['kind']} x{rope['factor']:g}"
    lines = [f"{result['stream_tokens']:,} tokens ({result['characters']:,} characters) of "
             f"{', '.join(result['data'])}; trained context {result['trained_length']}{scaled}",
             "length  stride  scored tokens    loss  perplexity  bits/char  bits/byte"]
    for r in result["results"]:
        mark = "*" if r["beyond_trained"] else " "
        lines.append(f"{r['length']:>6}{mark} {r['stride']:>6}  {r['tokens']:>13,}  {r['loss']:6.3f}  "
                     f"{r['perplexity']:10.2f}  {r['bits_per_char']:9.3f}  {r['bits_per_byte']:9.3f}")
    if any(r["beyond_trained"] for r in result["results"]):
        lines.append("* past the trained context" + (" (rotary angles extrapolated, no scaling)" if not scaled else ""))
    return "\n".join(lines)
