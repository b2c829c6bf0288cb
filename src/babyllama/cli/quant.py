"""`babyllama quantize`: a run's weights to packed low-bit integers (quant/stage.py)."""

from __future__ import annotations

import argparse

from babyllama.cli.flags import Default, add_encoding_flag, add_layout_flag, add_overwrite_flag


def _job():
    from babyllama.quant.stage import QuantizeJob

    return QuantizeJob


def cmd_quantize(args) -> None:
    import json
    from pathlib import Path

    from babyllama.quant.stage import MANIFEST, QuantizeJob, quantize, summary_line

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    job = QuantizeJob(ckpt=args.ckpt, out=args.out, method=args.method, bits=args.bits, group_size=args.group_size,
                      sym=args.sym, act_order=args.act_order, damp=args.damp, calib=args.calib or [],
                      calib_samples=args.calib_samples, calib_len=args.calib_len, head=not args.no_head,
                      threshold=args.threshold, layout=args.layout, encoding=args.encoding, seed=args.seed,
                      overwrite=args.overwrite, allow_unverified=args.allow_unverified)
    written = quantize(job)
    manifest = json.loads((Path(args.out) / MANIFEST).read_text(encoding="utf-8"))
    print(summary_line(manifest))
    print(f"quantized: {written} (use {args.out} as --ckpt with generate, chat, eval, sft --lora)")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a run's weights (RTN, GPTQ, AWQ, LLM.int8, BitNet) into packed low-bit integers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes a run whose checkpoint holds packed integer weights, scales and zero points (and\n"
                    "quantization.json: method, settings, per-layer error against plain RTN). generate, chat, eval\n"
                    "and sft --lora load it like any run; its layers run through the low-bit kernel.\n\n"
                    "  rtn   round to nearest, group by group (no calibration; the baseline)\n"
                    "  gptq  GPTQ: error feedback through the inverse Hessian of calibration inputs\n"
                    "  awq   activation-aware scales folded into the norms, then RTN\n"
                    "  int8  LLM.int8-style 8-bit rows; input columns with activations above --threshold stay float\n"
                    "  bitnet  pack a run trained with --bitnet (BitNet b1.58) as ternary weights, 2 bits each")
    p.add_argument("--ckpt", required=True, help="the float run (newest good checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="directory for the quantized run")
    p.add_argument("--method", choices=["rtn", "gptq", "awq", "int8", "bitnet"], default=Default(_job, "method"),
                   help="how the integer codes are chosen (default %(default)s)")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=Default(_job, "bits"),
                   help="bits per weight (default 4, int8: 8, bitnet: 2; 3-bit codes are stored in 4-bit slots)")
    p.add_argument("--group-size", type=int, default=Default(_job, "group_size"),
                   help="weights per scale along a row, a multiple of 32 dividing the model width; 0: one per row "
                        "(default %(default)s; a layer it does not divide uses the largest multiple of 32 that does)")
    p.add_argument("--sym", action="store_true", help="symmetric grids (zero in the middle) instead of min-max ones")
    p.add_argument("--act-order", action="store_true",
                   help="gptq: quantize columns in order of decreasing activation energy (groups stay contiguous)")
    p.add_argument("--damp", type=float, default=Default(_job, "damp"),
                   help="gptq: damping, a fraction of the Hessian's mean diagonal (default %(default)s)")
    p.add_argument("--calib", nargs="+", metavar="FILE|DIR",
                   help="calibration text for gptq, awq and int8: text files (FILE or FILE::LAYOUT) or a prepared "
                        "pretraining dataset made with this model's tokenizer")
    p.add_argument("--calib-samples", type=int, default=Default(_job, "calib_samples"),
                   help="calibration sequences (default %(default)s)")
    p.add_argument("--calib-len", type=int, default=Default(_job, "calib_len"),
                   help="tokens per calibration sequence (default: the model's context)")
    p.add_argument("--threshold", type=float, default=Default(_job, "threshold"),
                   help="int8: activation magnitude above which an input column stays float32 (default %(default)s)")
    p.add_argument("--no-head", action="store_true",
                   help="keep the LM head (and a tied embedding) in float32")
    p.add_argument("--seed", type=int, default=Default(_job, "seed"), help="which calibration rows are sampled")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept a checkpoint that has no checksums.json (not written by babyllama)")
    add_layout_flag(p, _job, "for --calib text files")
    add_encoding_flag(p, _job)
    add_overwrite_flag(p, "a quantized run")
    p.set_defaults(func=cmd_quantize)
