"""Using a model: `babyllama generate` and `babyllama chat`, with the same inference flags."""

from __future__ import annotations

import dataclasses
import sys

from babyllama.cli.flags import add_inference_flags


def check_inference_flags(args):
    """Every flag generate and chat share, checked before the model is loaded (a mistake costs no
    waiting). Returns the SamplingConfig."""
    from babyllama.config import DTYPES, ConfigError, check_int
    from babyllama.infer import SamplingConfig
    from babyllama.infer.sampling import check_max_new_tokens
    from babyllama.infer.text import check_encoding
    from babyllama.runtime import pick_device

    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16 (or fp32, bf16, fp16), "
                          f"got {args.dtype!r}")
    pick_device(args.device)  # a name this machine does not have is refused now, not after loading
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    check_max_new_tokens(args.max_new_tokens)
    if args.threads is not None:
        check_int("--threads", args.threads, 1)
    if args.encoding:
        check_encoding(args.encoding)
    return sampling


def load_engine(args):
    """The Engine as the inference flags say."""
    from babyllama.infer import Engine

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from babyllama.cli.flags import rope_from_args

    return Engine.load(args.ckpt, args.device, dtype=args.dtype, compile_step=False if args.no_compile else None,
                       allow_unverified=args.allow_unverified, rope=rope_from_args(args))


def cmd_generate(args) -> None:
    from babyllama.config import ConfigError, check_int
    from babyllama.infer.text import user_text

    sampling = check_inference_flags(args)
    check_int("--num-samples", args.num_samples, 1)
    if args.system and not args.chat:
        raise ConfigError("--system needs --chat (a system prompt is a turn of a conversation)")
    args.prompt = user_text(args.prompt, args.encoding, "--prompt")
    args.system = user_text(args.system, args.encoding, "--system") if args.system else args.system
    engine = load_engine(args)
    if args.chat:
        from babyllama.tokenizer.chat import Message

        msgs = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
            if args.seed is not None:  # reproducible, yet not N copies of one sample
                sampling = dataclasses.replace(sampling, seed=args.seed + i)
        if args.chat:
            engine.reply(msgs, args.max_new_tokens, sampling, on_text=_show)
        else:
            _show(args.prompt)
            engine.complete(args.prompt, args.max_new_tokens, sampling, on_text=_show)
        sys.stdout.write("\n")


def _show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_chat(args) -> None:
    from babyllama.infer.chat import repl

    sampling = check_inference_flags(args)
    repl(load_engine(args), sampling, args.max_new_tokens, system=args.system, encoding=args.encoding)


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens")
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user turn and answer it (SFT models)")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--num-samples", type=int, default=1, help="samples (or replies) to draw (default %(default)s)")
    add_inference_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a fine-tuned model (/reset, /system TEXT, /exit)")
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--system", help="system prompt")
    add_inference_flags(p)
    p.set_defaults(func=cmd_chat)
