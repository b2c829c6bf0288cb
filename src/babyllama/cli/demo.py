"""`babyllama demo`: the whole pipeline on the built-in corpus (what `make demo` runs)."""

from __future__ import annotations

from babyllama.cli.flags import Default


def _demo_config() -> type:
    from babyllama.demo import DemoConfig

    return DemoConfig


def cmd_demo(args) -> None:
    from babyllama.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, minutes=args.minutes, sft_minutes=args.sft_minutes, fresh=args.fresh,
                        vocab_size=args.vocab_size, workers=args.workers, curve=args.curve, align=args.align))


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="tokenizer -> data -> pretraining -> SFT -> alignment -> evaluation, on the built-in corpus")
    p.add_argument("--out", default=Default(_demo_config, "out"), help="demo directory (default %(default)s)")
    p.add_argument("--minutes", type=float, default=Default(_demo_config, "minutes"),
                   help="pretraining time budget (default %(default)s)")
    p.add_argument("--sft-minutes", type=float, default=Default(_demo_config, "sft_minutes"),
                   help="fine-tuning budget (default %(default)s); the from-scratch comparison takes the same steps")
    p.add_argument("--curve", default=Default(_demo_config, "curve"),
                   help="learning curve: fine-tune on this many labelled reviews, comma-separated, from the "
                        "pretrained model and from random weights (default %(default)s; \"\" skips it)")
    p.add_argument("--no-align", dest="align", action="store_false",
                   help="skip the alignment stage (GRPO and DPO against looping, about 6 minutes)")
    p.add_argument("--vocab-size", type=int, default=Default(_demo_config, "vocab_size"),
                   help="tokenizer vocabulary (default %(default)s)")
    p.add_argument("--workers", type=int, default=Default(_demo_config, "workers"),
                   help="processes preparing the data (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished steps")
    p.set_defaults(func=cmd_demo)
