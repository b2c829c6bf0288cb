"""`babyllama <stage>`: one command, a subcommand per pipeline stage, the same flag names everywhere.

    babyllama tokenizer train --input FILE... --out DIR [--vocab-size N] [--layout L]
    babyllama data pretrain   --input FILE... --tokenizer DIR --out DIR [--layout L] [--workers N]
    babyllama data sft        --input FILE... --tokenizer DIR --out DIR [--layout L] [--max-len N]
    babyllama pretrain        --preset NAME | --config FILE  --data DIR --out DIR [--max-steps N] [--resume]
    babyllama sft             --ckpt DIR --data FILE|DIR... --out DIR [--layout L] [--pack] [--resume]
                              [--lora | --dora] [--lora-rank R] [--lora-alpha A] [--lora-targets q,k,v,...]
    babyllama lora merge      --ckpt ADAPTER_RUN --out DIR        (adapter folded into plain weights)
    babyllama lora import     --peft DIR --base CKPT --out DIR    (a PEFT adapter as an adapter run)
    babyllama dpo             --ckpt SFT_RUN --data FILE... --out DIR [--beta B] [--loss sigmoid|ipo] [--lora]
    babyllama reward train    --ckpt SFT_RUN --data FILE... --out DIR   (a Bradley-Terry reward model)
    babyllama rl --algo grpo|ppo --ckpt SFT_RUN --prompts FILE --out DIR --reward-fn MODULE:FUNC | --reward RM_RUN
    babyllama quantize        --ckpt DIR --out DIR --method rtn|gptq|awq|int8 [--bits 2|3|4|8] [--group-size G]
                              [--calib FILE|DIR...]   (packed low-bit weights every stage loads)
    babyllama export          --ckpt DIR --out DIR [--format hf] [--type f32|f16|bf16] [--peft]
    babyllama export          --ckpt DIR --out FILE.gguf --format gguf [--type f16|f32|q8_0|q4_0]  (+ Modelfile)
    babyllama import          --hf DIR --out DIR      (a Hugging Face Llama as a run every stage takes)
    babyllama generate        --ckpt DIR --prompt TEXT [--chat] [--device D] [--dtype T]
    babyllama chat            --ckpt DIR [--device D] [--dtype T]
    babyllama serve           --ckpt DIR [--port 8000] [--api-key KEY] [--max-batch N]  (OpenAI API + chat page)
    babyllama eval ppl        --ckpt DIR --data DIR|FILE... [--lengths 256,512,1024] [--stride S]
    babyllama eval mc         --ckpt DIR --data DIR|FILE... [--shots K] [--split val|test|dev] [--score letter|text]
    babyllama eval gen        --ckpt DIR --data FILE... [--max-new-tokens N] [--max-samples N]
    babyllama eval pref       --ckpt DIR --data FILE... [--no-chat]   (preference accuracy on held-out pairs)
    babyllama report          RUN [RUN...] [--out DIR] [--title T]
    babyllama demo            the whole pipeline on the built-in corpus (what `make demo` runs)

Every stage is also a Python function taking a typed config (see README.md); a flag's default is
that config's default.
"""

# The package: flags.py holds the flag groups several stages share; each stage group (prepare.py,
# train.py, infer.py, demo.py) registers its subcommands and their cmd_* functions with
# `add_parsers(sub)`. A new group is one module with `add_parsers` and one entry in STAGE_GROUPS.
# Stages are imported by the cmd_* functions (and Default), never here: --help imports no torch.

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from babyllama.cli import align, demo, evaluate, export, infer, lora, prepare, quant, report, serve, train
from babyllama.cli.flags import Args

STAGE_GROUPS = (prepare, train, lora, align, quant, export, infer, serve, evaluate, report, demo)  # in the order `babyllama --help` lists their stages


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes reported as one `babyllama: error:` line like every other, and
    the flags parsed into `Args` (a default taken from a Python config is read when first used)."""

    def error(self, message: str):
        self.exit(2, f"babyllama: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(args, Args() if namespace is None else namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="babyllama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show Python's traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    for group in STAGE_GROUPS:
        group.add_parsers(sub)
    _add_debug_flag(parser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug` after the stage too (`babyllama pretrain ... --debug`), not only before it."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for child in action.choices.values():
            if child._subparsers is None:
                child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                   help="show Python's traceback on errors")
            else:
                _add_debug_flag(child)


def _leave_process_group() -> bool:
    """Tear down the process group a launched run joined, all ranks together. True if there was one."""
    if "torch" not in sys.modules:
        return False
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    gc.collect()  # collective work still referenced from garbage is freed while the interpreter is whole
    dist.barrier()  # no rank closes its connections while another is still using them
    dist.destroy_process_group()
    return True


def _exit_launched_process() -> None:
    """End a finished rank without the interpreter's teardown. Gloo's threads can abort a rank while
    C++ objects are destroyed at exit ("terminate called without an active exception", seen once in
    CI after a complete run): the launcher then reports a failed run whose checkpoints are all saved."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _user_errors() -> tuple[type, ...]:
    """Exceptions that mean the input, a flag or the environment is wrong: one line, exit code 2."""
    from babyllama.config import ConfigError
    from babyllama.corpus.readers import DataError
    from babyllama.outputs import OutputError
    from babyllama.tokenizer import TokenizerError

    return ConfigError, DataError, TokenizerError, OutputError, OSError


def _stopped_errors() -> tuple[type, ...]:
    """A run that stopped on purpose with an explanation (loss became NaN): one line, exit code 1."""
    try:
        from babyllama.train.loop import TrainingDiverged
    except ImportError:  # torch missing: the data stages still work
        return ()
    return (TrainingDiverged,)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _show_warnings_as_lines() -> None:
    """`babyllama: warning: ...`, not Python's two-line form with a source line."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"babyllama: warning: {_one_line(message)}", file=file or sys.stderr)

    warnings.showwarning = show


def _internal_error(e: BaseException) -> str:
    import traceback

    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return (f"babyllama: internal error{where}: {type(e).__name__}: {_one_line(e)} "
            f"(a bug: run again with --debug for the traceback, and please report it)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            # a group without its action ("babyllama data") shows that group's help
            parser.parse_args((argv or sys.argv[1:]) + ["--help"])
            return 2
    except SystemExit as e:  # --help, or a flag argparse refused (its one line is printed)
        return e.code if isinstance(e.code, int) else 2
    debug = bool(getattr(args, "debug", False) or os.environ.get("BABYLLAMA_DEBUG"))
    if not debug:
        _show_warnings_as_lines()
    try:
        args.func(args)
        if _leave_process_group() and argv is None:  # a rank started by a launcher, not a caller's function
            _exit_launched_process()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, _user_errors()):
            print(f"babyllama: error: {_one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, _stopped_errors()):
            print(f"babyllama: stopped: {_one_line(e)}", file=sys.stderr)
            return 1
        print(_internal_error(e), file=sys.stderr)
        return 1
    return 0
