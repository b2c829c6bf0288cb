"""`babyllama quantize`: a run's checkpoint -> a run holding its quantized checkpoint.

    rtn    round to nearest, group by group: no calibration, the baseline the others are measured by
    gptq   GPTQ on calibration activations (quant/gptq.py), block after block
    awq    activation-aware scales folded into the norms / previous projections, then RTN (quant/awq.py)
    int8   LLM.int8-style: 8-bit rows, with the input columns whose calibration activations exceed
           --threshold kept in float32
    bitnet packs a run trained with --bitnet (BitNet b1.58 QAT) as ternary codes, 2 bits a weight

Calibrated methods stream the model one block at a time: the calibration samples' hidden states
enter block i, its projections' inputs are recorded (Hessians for GPTQ, sampled rows for AWQ and
the error figures, column maxima for int8; the last eighth of the samples is held out, for the
error figures only), the block is quantized, and the states that leave the
*quantized* block feed block i + 1, so later blocks correct for earlier blocks' rounding. Memory is
the model plus one block's activations.

The output run has the checkpoint (packed codes, scales and zero points in model.safetensors; the
`quantize` transformation and its settings in config.json, so every stage loads it) and
quantization.json: the method, its parameters, the calibration data and, per layer, the relative
output error on held-out calibration inputs next to plain RTN's.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import babyllama.checkpoint as ckpt_io
from babyllama.config import ConfigError
from babyllama.quant.awq import search_scales
from babyllama.quant.bitnet import BitLinear, BitNet, ternary
from babyllama.quant.gptq import Hessian, gptq
from babyllama.quant.linear import QuantLinear
from babyllama.quant.pack import SUPPORTED_BITS, dequantize_codes, rtn
from babyllama.quant.transform import METHODS, Quantize, quantizable
from babyllama.transforms import applied, apply_transforms, replace_modules, unrecord

MANIFEST = "quantization.json"
SAMPLED_ROWS = 2048  # calibration rows kept per layer for AWQ's search and the error figures


@dataclass
class QuantizeJob:
    ckpt: str  # a run directory (its newest good checkpoint) or a checkpoint directory
    out: str
    method: str = "rtn"
    bits: int = 0  # 0: the method's default (int8: 8, the others: 4)
    group_size: int = 128  # columns per scale; 0: one scale per row
    sym: bool = False  # symmetric grids (zero point in the middle) instead of fitted [min, max]
    act_order: bool = False  # GPTQ: columns in order of decreasing activation energy
    damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added to it
    calib: list[str] = field(default_factory=list)  # text files or a prepared dataset directory
    calib_samples: int = 128
    calib_len: int = 0  # tokens per sample; 0: the model's context
    head: bool = True  # quantize the LM head too (tied: it then serves the embedding as well)
    threshold: float = 6.0  # int8: input columns with activations above this stay float32
    layout: str = "auto"
    encoding: str = "utf-8"
    seed: int = 0
    overwrite: bool = False
    allow_unverified: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        allowed = {"int8": (8,), "bitnet": (2,)}.get(self.method, SUPPORTED_BITS)
        self.bits = self.bits or (allowed[0] if len(allowed) == 1 else 4)
        if self.bits not in allowed:
            raise ConfigError(f"--method {self.method} takes --bits {' or '.join(map(str, allowed))}, got {self.bits}")
        if self.method == "int8":
            self.group_size, self.sym = 0, True  # LLM.int8: one scale per row, symmetric
        if self.method == "bitnet":  # one scale per matrix (on every row), ternary; the head stays float
            self.group_size, self.sym, self.head = 0, True, False
        if self.group_size < 0 or (self.group_size and self.group_size % 32):
            raise ConfigError(f"--group-size must be 0 (one scale per row) or a multiple of 32, got {self.group_size}")
        if self.method not in ("rtn", "bitnet") and not self.calib:
            raise ConfigError(f"--method {self.method} needs calibration text: --calib FILE|DIR (a few hundred "
                              f"thousand tokens of what the model will see)")
        if self.calib_samples < 1 or self.calib_len < 0:
            raise ConfigError("--calib-samples must be at least 1 and --calib-len at least 0")
        if not 0 < self.damp < 1:
            raise ConfigError(f"--damp must be between 0 and 1, got {self.damp}")


def quantize(job: QuantizeJob, log=print) -> Path:
    """Quantize `job.ckpt` into the run `job.out`; returns the written checkpoint directory."""
    from babyllama.rundir import open_run_dir, write_checkpoint_run

    ckpt = ckpt_io.find_checkpoint(job.ckpt, verify=True, allow_unverified=job.allow_unverified)
    meta = ckpt_io.read_meta(ckpt)
    recorded = [r.get("name") for r in meta.get("transforms", [])]
    if Quantize.name in recorded:
        raise ConfigError(f"{ckpt} is quantized already; quantize the float checkpoint it was made from")
    if (job.method == "bitnet") != (BitNet.name in recorded):
        raise ConfigError(f"{ckpt}: --method bitnet packs a run trained with --bitnet (ternary weights); "
                          f"this one was trained {'with' if BitNet.name in recorded else 'without'} it"
                          + ("" if BitNet.name in recorded else ": pretrain or sft it with --bitnet first"))
    model, _ = ckpt_io.load_model(ckpt, allow_unverified=job.allow_unverified, merge=True)
    model.float().eval()
    check_group_size_fits(model, job.group_size)
    tokens = calibration_tokens(job, ckpt, model.config.max_seq_len) if job.calib else None
    run = open_run_dir(job.out, resume=False, overwrite=job.overwrite, inputs=[job.ckpt, *job.calib])
    try:
        started = time.perf_counter()
        settings = Quantize(job.method, job.bits, job.group_size, job.sym, job.head)
        report: dict = {}
        if job.method == "rtn":
            apply_transforms(model, [settings])
        elif job.method == "bitnet":
            pack_bitnet(model)
            apply_transforms(model, [settings])
        else:
            report = calibrated(model, tokens, job, settings, log)
            settings.outliers = {name: n for name, n in report.pop("outliers").items() if n}
            settings.details = {"calib_samples": int(tokens.shape[0]), "calib_len": int(tokens.shape[1]),
                                **({"act_order": job.act_order, "damp": job.damp} if job.method == "gptq" else {}),
                                **({"threshold": job.threshold} if job.method == "int8" else {})}
            apply_transforms(model, [settings])  # records it; swaps what is left (nothing, or the head)
        seconds = time.perf_counter() - started
        info = {"method": job.method, "bits": job.bits, "from": str(ckpt)}
        written = write_checkpoint_run(Path(job.out), "quantize", model, ckpt, int(meta.get("step", 0)), info)
        manifest = {"method": job.method, "bits": job.bits, "group_size": job.group_size, "sym": job.sym,
                    "head": job.head, "from": str(ckpt), "calib": list(job.calib), "seconds": round(seconds, 1),
                    "transform": applied(model)[-1], "float_bytes": float_bytes(model),
                    "file_bytes": (written / ckpt_io.WEIGHTS).stat().st_size, **report}
        from babyllama.outputs import write_text_atomic

        write_text_atomic(Path(job.out) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return written
    finally:
        run.close()


@torch.no_grad()
def pack_bitnet(model: nn.Module) -> None:
    """Replace each trained BitLinear by its ternary codes (value + 1 at 2 bits, the matrix's scale
    on every row): the packed layer computes what the QAT forward computed."""
    def swap(name: str, module: nn.Module):
        if not isinstance(module, BitLinear):
            return None
        values, scale = ternary(module.weight.detach().float())
        rows = module.out_features
        return QuantLinear.from_codes((values + 1).to(torch.uint8), scale.expand(rows, 1).clone(),
                                      torch.ones(rows, 1), 2)

    replace_modules(model, swap)
    unrecord(model, BitNet.name)


def check_group_size_fits(model: nn.Module, group_size: int) -> None:
    dim = model.config.dim
    if 0 < group_size < dim and dim % group_size:
        raise ConfigError(f"--group-size {group_size} does not divide the model width {dim}; use a divisor of it "
                          f"that is a multiple of 32 (e.g. {', '.join(str(g) for g in (32, 64, 128) if dim % g == 0)}) "
                          f"or 0 for one scale per row")


def float_bytes(model: nn.Module) -> int:
    """What the model's weights take in float32 (the unquantized checkpoint's size, tied head once)."""
    cfg = model.config
    per_block = sum(m.in_features * m.out_features for m in model.layers[0].modules()
                    if isinstance(m, (nn.Linear, QuantLinear))) + 2 * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return 4 * (cfg.n_layers * per_block + cfg.vocab_size * cfg.dim + head + cfg.dim)


def calibration_tokens(job: QuantizeJob, ckpt: Path, context: int) -> torch.Tensor:
    """(samples, length) ids: consecutive windows of the calibration text, in the model's tokenizer."""
    from babyllama.eval.perplexity import token_stream
    from babyllama.tokenizer import load_tokenizer
    from babyllama.rundir import tokenizer_dir

    length = min(job.calib_len or context, context)
    tokenizer = load_tokenizer(tokenizer_dir(ckpt))
    stream = token_stream(job.calib, tokenizer, "train", job.calib_samples * length, job.layout, job.encoding)
    n = len(stream) // length
    if n < 1:
        raise ConfigError(f"{', '.join(job.calib)}: {len(stream)} tokens, fewer than one calibration sample of "
                          f"{length}; give more text or a smaller --calib-len")
    if n < job.calib_samples:
        print(f"babyllama: the calibration text gives {n} samples of {length} tokens, not {job.calib_samples}",
              file=sys.stderr)
    return torch.from_numpy(stream[:n * length].copy()).view(n, length)


class Recorder:
    """What a calibrated method needs of one projection's inputs, recorded by a forward pre-hook."""

    def __init__(self, module: nn.Linear, method: str, generator: torch.Generator):
        self.module, self.method, self.generator = module, method, generator
        self.hessian = Hessian(module.in_features) if method == "gptq" else None
        self.column_max = torch.zeros(module.in_features)
        self.rows: list[torch.Tensor] = []
        self.input_scale: torch.Tensor | None = None  # AWQ: the layer now sees its inputs divided by this
        self.seen = 0
        self._sample = None
        self.holdout = False  # set while held-out samples pass: recorded for the error figures only
        self.heldout: list[torch.Tensor] = []

    def __call__(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        keep = torch.randperm(x.shape[0], generator=self.generator)[:SAMPLED_ROWS]
        if self.holdout:
            self.heldout.append(x[keep])
            return
        if self.hessian is not None:
            self.hessian.add(x)
        self.column_max = torch.maximum(self.column_max, x.abs().amax(dim=0))
        self.rows.append(x[keep])
        self.seen += x.shape[0]

    def sample(self, scaled: bool = True) -> torch.Tensor:
        """Up to SAMPLED_ROWS recorded calibration input rows (the same ones each call); `scaled`: as
        the layer sees them after AWQ's scaling."""
        if self._sample is None:
            rows = torch.cat(self.rows)
            self._sample = rows[torch.randperm(rows.shape[0], generator=self.generator)[:SAMPLED_ROWS]]
        return self._scaled(self._sample, scaled)

    def heldout_sample(self, scaled: bool = True) -> torch.Tensor:
        """Input rows of the held-out samples (no method saw them): where the error figures are measured."""
        if not self.heldout:
            return self.sample(scaled)
        return self._scaled(torch.cat(self.heldout)[:SAMPLED_ROWS], scaled)

    def _scaled(self, rows: torch.Tensor, scaled: bool) -> torch.Tensor:
        return rows / self.input_scale if scaled and self.input_scale is not None else rows


@torch.no_grad()
def calibrated(model: nn.Module, tokens: torch.Tensor, job: QuantizeJob, settings: Quantize, log) -> dict:
    """Quantize block after block on calibration activations (see the module docstring); returns
    the per-layer error figures and outlier counts."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(job.seed)
    T = tokens.shape[1]
    cos, sin = model.rope.tables(T)
    cos, sin = cos[:T], sin[:T]
    batches = list(tokens.split(8))
    states = [model.tok_embeddings(b).float() for b in batches]
    layers, outliers = [], {}
    bar = tqdm(total=len(model.layers) + int(job.head), desc=f"{job.method} {job.bits}-bit", unit="block", file=sys.stderr)
    for i, block in enumerate(model.layers):
        recorders = record(block, f"layers.{i}.", job.method, generator,
                           lambda recs: run_with_holdout(recs, states, lambda s: block(s, cos, sin)))
        if job.method == "awq":
            scale_block(block, recorders, job, model.config)
        for name, rec in recorders.items():
            layers.append(quantize_layer(block, f"layers.{i}.", name, rec, job, settings, outliers))
        states = [block(s, cos, sin) for s in states]
        bar.update()
    if job.head:
        normed = [model.norm(s) for s in states]
        recorders = record(model, "", job.method, generator,
                           lambda recs: run_with_holdout(recs, normed, model.output), only="output")
        rec = recorders["output"]
        if job.method == "awq" and not model.config.tie_embeddings:
            scale_into_norm(model.norm, [model.output], rec, job)
        layers.append(quantize_layer(model, "", "output", rec, job, settings, outliers,
                                     method="rtn" if job.method == "awq" and model.config.tie_embeddings else None))
        bar.update()
    bar.close()
    ratios = [l["error"] / l["rtn_error"] for l in layers if l["rtn_error"] > 0]
    summary = {"layers": layers, "outliers": outliers,
               "mean_error_vs_rtn": math.exp(sum(math.log(max(r, 1e-12)) for r in ratios) / len(ratios)) if ratios else None}
    if job.method == "int8":
        summary["outlier_columns"] = sum(outliers.values())
    return summary


def run_with_holdout(recorders, batches: list[torch.Tensor], forward) -> None:
    """Forward every calibration batch; the last eighth of them (at least one, when there are two or
    more) is held out: the methods never see it, the error figures are measured on it."""
    first_heldout = len(batches) - max(1, len(batches) // 8) if len(batches) > 1 else len(batches)
    for j, batch in enumerate(batches):
        for rec in recorders:
            rec.holdout = j >= first_heldout
        forward(batch)
    for rec in recorders:
        rec.holdout = False


def record(root: nn.Module, prefix: str, method: str, generator, run, only: str | None = None) -> dict[str, Recorder]:
    """Run `run(recorders)` with a recorder on each plain projection under `root`: {qualified name: Recorder}."""
    recorders, handles = {}, []
    for name, module in root.named_modules():
        if type(module) is nn.Linear and (only is None or name == only) and quantizable(prefix + name, module, True):
            recorders[name] = Recorder(module, method, generator)
            handles.append(module.register_forward_pre_hook(recorders[name]))
    try:
        run(list(recorders.values()))
    finally:
        for h in handles:
            h.remove()
    return recorders


def relative_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    ref = x @ weight.t()
    return float((x @ approx.t() - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


def quantize_layer(root: nn.Module, prefix: str, name: str, rec: Recorder, job: QuantizeJob, settings: Quantize,
                   outliers: dict, method: str | None = None) -> dict:
    """Replace `root.<name>` by its quantized layer; returns its relative output error on held-out
    calibration rows and, for comparison, plain RTN's on the same rows."""
    method = method or job.method
    linear, qualified = rec.module, prefix + name
    group = settings.group_for(linear.in_features)
    if method == "gptq":
        codes, scales, zeros = gptq(linear.weight, rec.hessian.matrix, job.bits, group, job.sym, job.act_order, job.damp)
        layer = QuantLinear.from_codes(codes, scales, zeros, job.bits)
    elif method == "int8":
        index = torch.nonzero(rec.column_max > job.threshold).flatten()
        layer = QuantLinear.from_linear(linear, 8, 0, True, index if len(index) else None)
    else:  # rtn, and awq (whose scales are already folded into the weights)
        layer = QuantLinear.from_linear(linear, job.bits, group, job.sym)
    outliers[qualified] = 0 if layer.outlier_index is None else len(layer.outlier_index)
    x, weight = rec.heldout_sample(scaled=True), linear.weight.detach().float()
    # RTN's baseline: the same layer without AWQ's input scaling (rows another layer's scales
    # divided stay divided: a row scaled as a whole rounds to the same codes)
    x0, weight0 = rec.heldout_sample(scaled=False), weight if rec.input_scale is None else weight / rec.input_scale
    codes, scales, zeros = rtn(weight0, job.bits, group, job.sym)
    plain = dequantize_codes(codes.view(-1, group), scales.reshape(-1), zeros.reshape(-1)).view_as(weight0)
    _set_module(root, name, layer)
    return {"layer": qualified, "method": method, "error": relative_error(x, weight, layer.dequantized()),
            "rtn_error": relative_error(x0, weight0, plain), "calib_rows": rec.seen,
            **({"outliers": outliers[qualified]} if job.method == "int8" else {})}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def scale_block(block: nn.Module, recorders: dict[str, Recorder], job: QuantizeJob, cfg) -> None:
    """AWQ's scales for one block, folded in: q/k/v and gate/up into their norms, the output
    projection into v's rows (without grouped-query attention), down into up's rows."""
    attention, ff = block.attention, block.feed_forward
    scale_into_norm(block.attention_norm, [attention.wqkv], recorders["attention.wqkv"], job)
    scale_into_norm(block.ffn_norm, [ff.w13], recorders["feed_forward.w13"], job)
    if cfg.n_kv_heads == cfg.n_heads:
        v_rows = slice((cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim, None)
        scale_into_rows(attention.wqkv, v_rows, attention.wo, recorders["attention.wo"], job)
    scale_into_rows(ff.w13, slice(ff.hidden_dim, None), ff.w2, recorders["feed_forward.w2"], job)


def _search(layers: list[nn.Linear], rec: Recorder, job: QuantizeJob) -> torch.Tensor:
    group = Quantize(group_size=job.group_size).group_for(layers[0].in_features)
    scales, *_ = search_scales([l.weight for l in layers], rec.sample(scaled=False), job.bits, group, job.sym)
    return scales


def scale_into_norm(norm: nn.Module, layers: list[nn.Linear], rec: Recorder, job: QuantizeJob) -> None:
    s = _search(layers, rec, job)
    norm.weight.div_(s)
    for layer in layers:
        layer.weight.mul_(s)
    rec.input_scale = s  # the inputs the scaled layer now sees are divided by s


def scale_into_rows(before: nn.Linear, rows: slice, layer: nn.Linear, rec: Recorder, job: QuantizeJob) -> None:
    s = _search([layer], rec, job)
    before.weight[rows].div_(s[:, None])
    layer.weight.mul_(s)
    rec.input_scale = s


def summary_line(manifest: dict) -> str:
    size = manifest["file_bytes"] / manifest["float_bytes"]
    line = f"{manifest['method']} {manifest['bits']}-bit: {manifest['file_bytes'] / 2**20:.1f} MiB " \
           f"({size:.0%} of float32) in {manifest['seconds']:.0f} s"
    if manifest.get("mean_error_vs_rtn"):
        line += f"; layer output error {manifest['mean_error_vs_rtn']:.2f}x RTN's (geometric mean)"
    if "outlier_columns" in manifest:
        line += f"; {manifest['outlier_columns']} float outlier columns"
    return line

