"""`babyllama export` (a run as a Hugging Face directory or a GGUF file) and `babyllama import` (a
Hugging Face Llama as a run): export/stage.py."""

from __future__ import annotations

import argparse

from babyllama.cli.flags import add_overwrite_flag


def cmd_export(args) -> None:
    from babyllama.export.stage import ExportJob, export

    written = export(ExportJob(ckpt=args.ckpt, out=args.out, format=args.format, type=args.type, peft=args.peft,
                               base=args.base, overwrite=args.overwrite, allow_unverified=args.allow_unverified))
    if args.format == "gguf":
        size = written.stat().st_size / 2**20
        modelfile = written.with_suffix(".Modelfile")
        print(f"exported: {written} ({size:.1f} MiB) and {modelfile}")
        print(f"  llama.cpp: llama-cli -m {written} -cnv    Ollama: ollama create NAME -f {modelfile}")
    else:
        print(f"exported: {written} (AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained)")


def cmd_import(args) -> None:
    from babyllama.export.stage import ImportJob, import_hf
    from babyllama.tokenizer import IM_END, IM_START, load_tokenizer

    ckpt = import_hf(ImportJob(hf=args.hf, out=args.out, overwrite=args.overwrite))
    print(f"imported: {ckpt} (use {args.out} as --ckpt anywhere)")
    tok = load_tokenizer(f"{args.out}/tokenizer")
    if not {IM_START, IM_END} <= set(tok.special_tokens) and "sop" not in tok.special_tokens:
        print(f"note: its tokenizer has no {IM_START}/{IM_END} tokens, so chat and chat-layout SFT cannot use it; "
              f"generate, eval ppl/mc and plain-text fine-tuning can")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export", help="a run as a Hugging Face model directory or a GGUF file (llama.cpp, Ollama)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="  --format hf    a directory transformers loads with no custom code: config.json,\n"
                    "                 generation_config.json, model.safetensors, tokenizer.json, tokenizer.model,\n"
                    "                 tokenizer_config.json (special tokens, the chat template)\n"
                    "  --format gguf  one FILE.gguf llama.cpp and Ollama load (weights, vocabulary, chat template),\n"
                    "                 and an Ollama Modelfile beside it\n\n"
                    "An adapter run is merged into its base (or, with --peft, exported as base + PEFT adapter);\n"
                    "a quantized run goes out as the float values of its codes, with a warning; a RoPE scaling\n"
                    "the target cannot compute (CLEX; dynamic NTK for GGUF) is refused.")
    p.add_argument("--ckpt", required=True, help="the run (newest good checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="hf: the directory to write; gguf: the FILE.gguf to write")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="what to write (default %(default)s)")
    p.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="weight type: hf f32 (default), f16, bf16; gguf f16 (default), f32, q8_0, q4_0")
    p.add_argument("--peft", action="store_true",
                   help="an adapter run: export its base, and the adapter as a PEFT directory in OUT/adapter")
    p.add_argument("--base", help="where an adapter run's base checkpoint is now, if it moved")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept a checkpoint that has no checksums.json (not written by babyllama)")
    add_overwrite_flag(p, "an export")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="a Hugging Face Llama model directory (safetensors + tokenizer) as a run")
    p.add_argument("--hf", required=True, metavar="DIR",
                   help="a transformers LlamaForCausalLM directory: config.json, *.safetensors, tokenizer files")
    p.add_argument("--out", required=True, help="the run directory to write (one checkpoint + tokenizer)")
    add_overwrite_flag(p, "a run")
    p.set_defaults(func=cmd_import)
