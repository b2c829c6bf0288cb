"""Measuring a model: `babyllama eval ppl` (more benchmarks come to this group)."""

from __future__ import annotations

import argparse

from babyllama.cli.flags import Default, add_encoding_flag, add_layout_flag


def _ppl_config():
    from babyllama.eval.perplexity import PerplexityConfig

    return PerplexityConfig


def _lengths(text: str) -> list[int]:
    from babyllama.config import ConfigError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--lengths must be comma-separated integers, e.g. 256,512,1024; got {text!r}") from None


def cmd_eval_ppl(args) -> None:
    import torch

    from babyllama.eval.perplexity import PerplexityConfig, format_table, perplexity

    cfg = PerplexityConfig(ckpt=args.ckpt, data=args.data, lengths=_lengths(args.lengths or ""), stride=args.stride,
                           split=args.split, max_tokens=args.max_tokens, batch_size=args.batch_size,
                           device=args.device, dtype=args.dtype, layout=args.layout, encoding=args.encoding,
                           allow_unverified=args.allow_unverified, out=args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = perplexity(cfg)
    print(format_table(result))
    if "written_to" in result:
        print(f"-> {result['written_to']}")


def add_parsers(sub) -> None:
    group = sub.add_parser("eval", help="measure a model: perplexity at any context length").add_subparsers(
        dest="action", metavar="ACTION")
    p = group.add_parser("ppl", help="perplexity, bits per character and per byte, at one or several lengths",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Scores the same tokens at every --lengths value with sliding windows "
                                     "(every token but the first\nscored once); lengths past the model's "
                                     "trained context extend its rotary tables (no scaling).\nBits per character "
                                     "and per byte do not depend on the tokenizer. Results go to RUN/eval/ppl-DATA.json\n"
                                     "when --ckpt is a run directory (or to --out).")
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR|FILE",
                   help="a pretraining dataset directory (its --split) and/or text files (FILE or FILE::LAYOUT)")
    p.add_argument("--lengths", help="context lengths, comma-separated, e.g. 256,512,1024 (default: the model's)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: half of each length)")
    p.add_argument("--split", choices=["val", "train"], default=Default(_ppl_config, "split"),
                   help="split of a dataset directory (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=Default(_ppl_config, "max_tokens"),
                   help="tokens of the text scored, the same ones at every length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=Default(_ppl_config, "batch_size"),
                   help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default=Default(_ppl_config, "device"), help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default=Default(_ppl_config, "dtype"), help="float32 (default), bfloat16, float16")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--out", help="write the results as JSON here (default: RUN/eval/ppl-DATA.json for a run directory)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load a checkpoint that has no checksums.json (not written by babyllama)")
    add_layout_flag(p, _ppl_config, "of text files: see `babyllama data pretrain --help`")
    add_encoding_flag(p, _ppl_config)
    p.set_defaults(func=cmd_eval_ppl)
