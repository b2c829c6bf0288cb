"""Adapters in and out: `babyllama lora merge` (an adapter run -> plain weights) and `babyllama lora
import` (a PEFT adapter -> an adapter run). Training them is `babyllama sft --lora`."""

from __future__ import annotations


def cmd_merge(args) -> None:
    from babyllama.finetune.lora import MergeJob, merge_lora

    ckpt = merge_lora(MergeJob(ckpt=args.ckpt, out=args.out, base=args.base, overwrite=args.overwrite,
                               allow_unverified=args.allow_unverified))
    print(f"merged: {ckpt} (plain weights; use {args.out} as --ckpt anywhere)")


def cmd_import(args) -> None:
    from babyllama.finetune.lora import ImportJob, import_peft

    ckpt = import_peft(ImportJob(adapter=args.peft, base=args.base, out=args.out, overwrite=args.overwrite,
                                 allow_unverified=args.allow_unverified))
    print(f"imported: {ckpt} (an adapter run over {args.base}; use {args.out} as --ckpt anywhere)")


def add_parsers(sub) -> None:
    group = sub.add_parser("lora", help="merge an adapter run into plain weights, or import a PEFT adapter")
    actions = group.add_subparsers(dest="lora_command", metavar="ACTION")

    p = actions.add_parser("merge", help="fold a LoRA/DoRA run's adapter into its base: a run with plain weights")
    p.add_argument("--ckpt", required=True, help="the adapter run (newest good checkpoint) or one of its checkpoints")
    p.add_argument("--out", required=True, help="directory for the merged run (tokenizer + one checkpoint)")
    p.add_argument("--base", help="where the base checkpoint is now, if it moved (its weights must be the ones "
                                  "the adapter was trained on)")
    _common(p)
    p.set_defaults(func=cmd_merge)

    p = actions.add_parser("import", help="a PEFT LoRA/DoRA adapter (trained on this model exported to "
                                          "transformers) as an adapter run")
    p.add_argument("--peft", required=True, metavar="DIR",
                   help="PEFT adapter directory: adapter_config.json + adapter_model.safetensors")
    p.add_argument("--base", required=True, help="the babyllama run or checkpoint the adapter was trained over")
    p.add_argument("--out", required=True, help="directory for the adapter run")
    _common(p)
    p.set_defaults(func=cmd_import)


def _common(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept checkpoints that have no checksums.json (not written by babyllama)")
