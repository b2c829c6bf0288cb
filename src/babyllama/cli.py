"""`babyllama <stage>`: one command, a subcommand per pipeline stage, the same flag names everywhere.

    babyllama tokenizer train --input FILE... --vocab-size N --out DIR
    babyllama data pretrain   --input FILE... --tokenizer DIR --out DIR [--workers N]
    babyllama data sft        --input FILE... --tokenizer DIR --out DIR [--format F] [--max-len N]
    babyllama pretrain        --preset NAME | --config FILE  --data DIR --out DIR [--max-steps N] [--resume]
    babyllama generate        --ckpt DIR --prompt TEXT [--chat]
    babyllama sft             --ckpt DIR --data FILE|DIR... --out DIR [--pack]
    babyllama chat            --ckpt DIR
    babyllama demo            the whole pipeline on the built-in corpus (what `make demo` runs)

Every stage is also a Python function taking a typed config (see README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes reported as one `babyllama: error:` line like every other."""

    def error(self, message: str):
        self.exit(2, f"babyllama: error: {message} (see `{self.prog} --help`)\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (preset <- --config file <- flags)")
    g.add_argument("--preset", help="starting point: tiny (default), original (512/8/8, seq 256), 125m")
    g.add_argument("--config", help="TOML file overriding any field; see configs/*.toml")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set train.lr=1e-3 --set model.n_layers=6 (repeatable)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch (train.batch_size)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (train.grad_accum)")
    g.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", help="auto (default: bf16 on GPUs that have it, float32 on CPUs), float32, bfloat16, float16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps after a warm-up)")
    g.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun with several processes: ddp (default; whole model per rank) or fsdp "
                        "(FSDP2: parameters, gradients and optimizer state sharded)")
    g.add_argument("--deepspeed", metavar="CONFIG.json",
                   help="train through DeepSpeed ZeRO with this config (stage etc.); batch, accumulation, "
                        "optimizer, clipping and precision are filled in from the babyllama settings")
    g.add_argument("--stop-at-step", type=int, metavar="N",
                   help="pause at step N with a checkpoint (the schedule still runs to --max-steps; --resume continues)")
    g.add_argument("--max-minutes", type=float, help="stop with a checkpoint after this many minutes")
    g.add_argument("--seed", type=int, help="random seed (train.seed)")


def _run_config(args, base=None):
    from babyllama.config import FLAGS, config_file_preset, load_config, parse_overrides

    overrides = parse_overrides(args.set)
    train = overrides.setdefault("train", {})
    for field_name, flag in FLAGS.items():  # the flags that set a train.* field, as config.py names them
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            train[field_name.split(".", 1)[1]] = value
    if getattr(args, "compile", False):
        train["compile"] = True
    preset_name = args.preset
    if args.config and not preset_name:
        preset_name = config_file_preset(args.config)
    return load_config(args.config, preset_name, overrides, base=base)


def cmd_tokenizer_train(args) -> None:
    from babyllama.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    tok = train_tokenizer(TokenizerTrainConfig(inputs=args.input, out=args.out, vocab_size=args.vocab_size,
                                               layout=args.layout, max_sentences=args.max_sentences,
                                               character_coverage=args.character_coverage,
                                               overwrite=args.overwrite, encoding=args.encoding))
    print(f"trained {tok.vocab_size}-token BPE tokenizer -> {args.out} (fingerprint {tok.fingerprint})")


def cmd_data_pretrain(args) -> None:
    from babyllama.data.pretrain import PrepareConfig, prepare_pretrain

    m = prepare_pretrain(PrepareConfig(inputs=args.input, tokenizer=args.tokenizer, out=args.out,
                                       layout=args.layout, workers=args.workers, val_fraction=args.val_fraction,
                                       on_error=args.on_error, exclude=args.exclude or [], overwrite=args.overwrite,
                                       encoding=args.encoding))
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"{m['characters']:,} characters -> {tr['tokens']:,} train tokens ({tr['documents']:,} documents), "
          f"{va['tokens']:,} validation tokens, {m['dtype']}, in {m['seconds']:.1f}s -> {args.out}")


def cmd_data_sft(args) -> None:
    from babyllama.data.sft import PrepareSFTConfig, prepare_sft

    m = prepare_sft(PrepareSFTConfig(inputs=args.input, tokenizer=args.tokenizer, out=args.out, layout=args.format,
                                     max_len=args.max_len, val_fraction=args.val_fraction, on_error=args.on_error,
                                     overwrite=args.overwrite, encoding=args.encoding))
    print(f"{m['conversations']:,} conversations -> {m['train']:,} train ({m['train_tokens']:,} tokens), "
          f"{m['val']:,} validation; {m['skipped']} skipped, {m.get('fixed', 0)} fixed, "
          f"{m['truncated_prompt']} prompts and {m['truncated_reply']} replies truncated to {m['max_len']} tokens "
          f"-> {args.out}")


def cmd_pretrain(args) -> None:
    from pathlib import Path

    from babyllama.train.pretrain import PretrainJob, pretrain

    saved = Path(args.out) / "run_config.toml"
    if args.resume and not (args.config or args.preset) and saved.is_file():
        args.config = str(saved)  # resuming: the run's own config, with only the flags given now on top
    cfg = _run_config(args)
    summary = pretrain(PretrainJob(data=args.data, out=args.out, config=cfg, resume=args.resume, init=args.init,
                                   tokenizer=args.tokenizer, stop_at_step=args.stop_at_step,
                                   overwrite=args.overwrite, allow_unverified=args.allow_unverified))
    _report_run(summary)


def _report_run(summary: dict) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return
    val = summary["val"]
    if val:
        print(f"validation loss {val[0][1]:.3f} (step {val[0][0]}) -> {val[-1][1]:.3f} (step {val[-1][0]})")
    print(f"stopped ({summary['stopped']}) at step {summary['step']}; checkpoint {summary['checkpoint']}")


def cmd_generate(args) -> None:
    import torch

    from babyllama.config import check_int
    from babyllama.infer import generate_text, load_for_inference
    from babyllama.infer.sampling import check_max_new_tokens
    from babyllama.infer.text import check_encoding, user_text

    # every flag checked before the model is loaded: a mistake costs no waiting
    sampling = _sampling(args)
    check_max_new_tokens(args.max_new_tokens)
    check_int("--num-samples", args.num_samples, 1)
    if args.threads is not None:
        check_int("--threads", args.threads, 1)
    if args.encoding:
        check_encoding(args.encoding)
    args.prompt = user_text(args.prompt, args.encoding, "--prompt")
    args.system = user_text(args.system, args.encoding, "--system") if args.system else args.system
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, ckpt = load_for_inference(args.ckpt, args.device, compile_step=False if args.no_compile else None,
                                          allow_unverified=args.allow_unverified)
    if args.chat:
        from babyllama.infer.chat import chat_reply
        from babyllama.tokenizer.chat import ChatTemplate, Message

        msgs = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
        chat_reply(model, tok, ChatTemplate(tok), msgs, args.max_new_tokens, sampling,
                   on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        return
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        generate_text(model, tok, args.prompt, args.max_new_tokens, sampling,
                      on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")


def cmd_sft(args) -> None:
    from babyllama.config import RunConfig
    from babyllama.finetune.sft import SFTJob, default_sft_train, sft

    # the SFT defaults (default_sft_train) <- --preset/--config <- flags; the model comes from --ckpt
    train = _run_config(args, base=RunConfig(train=default_sft_train())).train
    summary = sft(SFTJob(ckpt=args.ckpt, data=args.data, out=args.out, train=train, layout=args.format,
                         val_fraction=args.val_fraction, resume=args.resume, on_error=args.on_error,
                         pack=args.pack, stop_at_step=args.stop_at_step, dropout=args.dropout,
                         overwrite=args.overwrite, allow_unverified=args.allow_unverified, encoding=args.encoding))
    _report_run(summary)


def cmd_chat(args) -> None:
    from babyllama.infer import load_for_inference
    from babyllama.infer.chat import repl
    from babyllama.infer.sampling import check_max_new_tokens
    from babyllama.infer.text import check_encoding

    sampling = _sampling(args)  # flags checked before the model is loaded
    check_max_new_tokens(args.max_new_tokens)
    if args.encoding:
        check_encoding(args.encoding)
    model, tok, _ = load_for_inference(args.ckpt, args.device, compile_step=False if args.no_compile else None,
                                       allow_unverified=args.allow_unverified)
    repl(model, tok, sampling, args.max_new_tokens, system=args.system, encoding=args.encoding)


def _sampling(args):
    from babyllama.infer import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="0 disables (default 50)")
    p.add_argument("--top-p", type=float, default=0.9, help="1 disables (default 0.9)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="1 disables (default 1.1)")
    p.add_argument("--seed", type=int, help="make sampling reproducible")
    p.add_argument("--device", default="auto")
    p.add_argument("--encoding", help="the encoding of text you type or pass (default: UTF-8; e.g. gbk)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load a checkpoint that has no checksums.json (not written by babyllama)")
    p.add_argument("--no-compile", action="store_true",
                   help="decode without compiling the one-token step (models of 8M+ parameters compile it: "
                        "~10 s once, then ~25%% faster tokens; compiled code is cached on disk)")


def _add_encoding_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoding", default="utf-8",
                   help="encoding of the input files (default utf-8, with or without a byte-order mark); "
                        "Chinese corpora are often gb18030 (a superset of GBK)")


def _add_overwrite_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} already in --out (never a directory that holds anything else)")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run: its checkpoints and logs are deleted")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept checkpoints that have no checksums.json (not written by babyllama)")


def cmd_demo(args) -> None:
    from babyllama.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, minutes=args.minutes, sft_minutes=args.sft_minutes, fresh=args.fresh,
                        vocab_size=args.vocab_size,
                        workers=args.workers))


SFT_FORMATS_HELP = ("Formats (--format, or per file as FILE::FORMAT): auto (default), alpaca, sharegpt, openai, "
                    "qa, csv,\ncsv:PROMPT_COL,ANSWER_COL. JSON lines, JSON arrays and CSV with a header; UTF-8 "
                    "unless --encoding.\nEach conversation is checked (user and assistant alternate, starting "
                    "with the user, after an\noptional system turn; no empty turn): records that break a rule "
                    "or are malformed are skipped\nand reported with file, line and reason (--on-error raise "
                    "stops instead); a trailing\nunanswered user turn is dropped and counted as fixed.")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="babyllama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show Python's traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")

    tok = sub.add_parser("tokenizer", help="train or inspect tokenizers").add_subparsers(dest="action", metavar="ACTION")
    p = tok.add_parser("train", help="train a BPE tokenizer (byte fallback, split digits, chat specials)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text, JSON lines, JSON array or Parquet files")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layout", default="auto", help="where the text is in each record (see `data pretrain --help`)")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training (default 2M)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters given their own token; the rest fall back to bytes (default 0.9995)")
    _add_encoding_flag(p)
    _add_overwrite_flag(p, "a tokenizer")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="action", metavar="ACTION")
    p = data.add_parser("pretrain", help="tokenize a corpus into training shards",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Layouts (--layout, or per file as FILE::LAYOUT):\n"
                                    "  auto (default), lines, paragraphs, peoples_daily, text, wikipedia, baike, "
                                    "field:NAME,\n  csv:COLUMN (a CSV file with a header: the text of one column)\n"
                                    "Files are UTF-8 (a byte-order mark is fine); name another encoding with "
                                    "--encoding (e.g. gb18030).")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="files to read (FILE or FILE::LAYOUT)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    p.add_argument("--out", required=True, help="output directory (new, empty, or a dataset to replace with --overwrite)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--layout", default="auto", help="where the text is (see above)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out (default 0.005)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad records: stop with file:line (default) or skip and count them")
    p.add_argument("--exclude", nargs="*", metavar="FILE", help="files of texts (one per line) to keep out of the shards")
    _add_encoding_flag(p)
    _add_overwrite_flag(p, "a pretraining dataset")
    p.set_defaults(func=cmd_data_pretrain)

    p = data.add_parser("sft", help="tokenize conversations once for `babyllama sft`",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=SFT_FORMATS_HELP + "\nTruncation: conversations longer than --max-len lose their "
                                    "earliest turns first;\na reply is cut only when it alone is too long, and every "
                                    "cut is counted in the manifest.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="SFT files (FILE or FILE::FORMAT)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer of the model you will fine-tune")
    p.add_argument("--out", required=True, help="output directory (new, empty, or a dataset to replace with --overwrite)")
    p.add_argument("--format", default="auto", help="record layout (see above)")
    p.add_argument("--max-len", type=int, default=1025,
                   help="tokens per conversation: the model's max_seq_len + 1 (default 1025)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of conversations held out (default 0.02)")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="malformed records: skip and count them (default) or stop at the first")
    _add_encoding_flag(p)
    _add_overwrite_flag(p, "an SFT dataset")
    p.set_defaults(func=cmd_data_sft)

    p = sub.add_parser("pretrain", help="pretrain a model on prepared shards")
    p.add_argument("--data", required=True, help="directory written by `babyllama data pretrain`")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--init", metavar="CKPT", help="start from these weights (new optimizer and schedule)")
    p.add_argument("--tokenizer", help="check that the shards were made with this tokenizer")
    _add_run_flags(p)
    _add_config_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("generate", help="continue a prompt, streaming tokens")
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user turn and answer it (SFT models)")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--threads", type=int, help="CPU threads")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (loss on assistant replies only)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=SFT_FORMATS_HELP)
    p.add_argument("--ckpt", required=True, help="pretrained run directory or checkpoint to start from")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="SFT files (FILE or FILE::FORMAT) or directories written by `babyllama data sft`")
    p.add_argument("--out", required=True, help="run directory for the fine-tuned model")
    p.add_argument("--format", default="auto", help="record layout (see above)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of conversations held out (default 0.02)")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="malformed records: skip and count them (default) or stop at the first")
    p.add_argument("--dropout", type=float, help="dropout while fine-tuning (default: the model's, usually 0)")
    p.add_argument("--pack", action="store_true",
                   help="pack several short conversations into each row of max_seq_len tokens (they never "
                        "attend to each other); --batch-size then counts rows")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    _add_encoding_flag(p)
    _add_run_flags(p)
    _add_config_flags(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("chat", help="talk to a fine-tuned model (/reset, /system TEXT, /exit)")
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--system", help="system prompt")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="tokenizer -> data -> pretraining -> SFT -> accuracy and chat, on the built-in corpus")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining time budget (default 10)")
    p.add_argument("--sft-minutes", type=float, default=4.0,
                   help="fine-tuning budget (default 4); the from-scratch comparison takes the same steps")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished steps")
    p.set_defaults(func=cmd_demo)
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


if __name__ == "__main__":
    sys.exit(main())
