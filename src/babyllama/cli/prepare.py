"""Preparing inputs: `babyllama tokenizer train`, `babyllama data pretrain`, `babyllama data sft`."""

from __future__ import annotations

import argparse
import os

from babyllama.cli.flags import Default, add_encoding_flag, add_layout_flag, add_on_error_flag, add_overwrite_flag

PRETRAIN_LAYOUTS_HELP = ("Layouts (--layout, or per file as FILE::LAYOUT):\n"
                         "  auto (default), lines, paragraphs, peoples_daily, text, wikipedia, baike, field:NAME,\n"
                         "  csv:COLUMN (a CSV file with a header: the text of one column)\n"
                         "Files are UTF-8 (a byte-order mark is fine); name another encoding with --encoding "
                         "(e.g. gb18030).")

SFT_LAYOUTS_HELP = ("Layouts (--layout, or per file as FILE::LAYOUT): auto (default), alpaca, sharegpt, openai, "
                    "qa, csv,\ncsv:PROMPT_COL,ANSWER_COL. JSON lines, JSON arrays and CSV with a header; UTF-8 "
                    "unless --encoding.\nEach conversation is checked (user and assistant alternate, starting "
                    "with the user, after an\noptional system turn; no empty turn): records that break a rule "
                    "or are malformed are skipped\nand reported with file, line and reason (--on-error raise "
                    "stops instead); a trailing\nunanswered user turn is dropped and counted as fixed.")


def _tokenizer_config() -> type:
    from babyllama.tokenizer.train import TokenizerTrainConfig

    return TokenizerTrainConfig


def _pretrain_data_config() -> type:
    from babyllama.data.pretrain import PrepareConfig

    return PrepareConfig


def _sft_data_config() -> type:
    from babyllama.data.sft import PrepareSFTConfig

    return PrepareSFTConfig


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

    m = prepare_sft(PrepareSFTConfig(inputs=args.input, tokenizer=args.tokenizer, out=args.out, layout=args.layout,
                                     max_len=args.max_len, val_fraction=args.val_fraction, on_error=args.on_error,
                                     overwrite=args.overwrite, encoding=args.encoding))
    print(f"{m['conversations']:,} conversations -> {m['train']:,} train ({m['train_tokens']:,} tokens), "
          f"{m['val']:,} validation; {m['skipped']} skipped, {m.get('fixed', 0)} fixed, "
          f"{m['truncated_prompt']} prompts and {m['truncated_reply']} replies truncated to {m['max_len']} tokens "
          f"-> {args.out}")


def add_parsers(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train or inspect tokenizers").add_subparsers(dest="action", metavar="ACTION")
    p = tok.add_parser("train", help="train a BPE tokenizer (byte fallback, split digits, chat specials)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text, JSON lines, JSON array or Parquet files (FILE or FILE::LAYOUT)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=Default(_tokenizer_config, "vocab_size"),
                   help="vocabulary size (default %(default)s)")
    add_layout_flag(p, _tokenizer_config, "see `babyllama data pretrain --help`")
    p.add_argument("--max-sentences", type=int, default=Default(_tokenizer_config, "max_sentences"),
                   help="lines sampled for training (default %(default)s)")
    p.add_argument("--character-coverage", type=float, default=Default(_tokenizer_config, "character_coverage"),
                   help="share of characters given their own token; the rest fall back to bytes (default %(default)s)")
    add_encoding_flag(p, _tokenizer_config)
    add_overwrite_flag(p, "a tokenizer")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="action", metavar="ACTION")
    p = data.add_parser("pretrain", help="tokenize a corpus into training shards",
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=PRETRAIN_LAYOUTS_HELP)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="files to read (FILE or FILE::LAYOUT)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    p.add_argument("--out", required=True, help="output directory (new, empty, or a dataset to replace with --overwrite)")
    add_layout_flag(p, _pretrain_data_config)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=Default(_pretrain_data_config, "val_fraction"),
                   help="share of documents held out (default %(default)s)")
    add_on_error_flag(p, _pretrain_data_config)
    p.add_argument("--exclude", nargs="*", metavar="FILE", help="files of texts (one per line) to keep out of the shards")
    add_encoding_flag(p, _pretrain_data_config)
    add_overwrite_flag(p, "a pretraining dataset")
    p.set_defaults(func=cmd_data_pretrain)

    p = data.add_parser("sft", help="tokenize conversations once for `babyllama sft`",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=SFT_LAYOUTS_HELP + "\nTruncation: conversations longer than --max-len lose their "
                                    "earliest turns first;\na reply is cut only when it alone is too long, and every "
                                    "cut is counted in the manifest.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="SFT files (FILE or FILE::LAYOUT)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer of the model you will fine-tune")
    p.add_argument("--out", required=True, help="output directory (new, empty, or a dataset to replace with --overwrite)")
    add_layout_flag(p, _sft_data_config)
    p.add_argument("--max-len", type=int, default=Default(_sft_data_config, "max_len"),
                   help="tokens per conversation: the model's max_seq_len + 1 (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=Default(_sft_data_config, "val_fraction"),
                   help="share of conversations held out (default %(default)s)")
    add_on_error_flag(p, _sft_data_config)
    add_encoding_flag(p, _sft_data_config)
    add_overwrite_flag(p, "an SFT dataset")
    p.set_defaults(func=cmd_data_sft)
