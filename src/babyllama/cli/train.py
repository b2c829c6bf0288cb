"""Training: `babyllama pretrain` and `babyllama sft`, one loop, one set of run flags."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from babyllama.cli.flags import Default, add_config_flags, add_encoding_flag, add_layout_flag, add_lora_flags, \
    add_on_error_flag, add_rope_flags, add_run_flags
from babyllama.cli.prepare import SFT_LAYOUTS_HELP

RUN_CONFIG = "run_config.toml"  # what a run writes into its --out: the settings a --resume starts from


def _sft_job() -> type:
    from babyllama.finetune.sft import SFTJob

    return SFTJob


def read_config_file(path: str | Path) -> dict:
    """A --config TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    import sys

    from babyllama.config import ConfigError

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def run_config(args, base=None, file: dict | None = None):
    """Preset (or `base`, the stage's own defaults) <- the --config file (`file`, its tables) <- --set
    <- the flags that set a train.* field. A file may name its preset (`preset = "name"`)."""
    from babyllama.config import FLAGS, RunConfig, load_config, parse_overrides

    overrides = parse_overrides(args.set)
    train = overrides.setdefault("train", {})
    for field_name, flag in FLAGS.items():  # the flags that set a field directly, as config.py names them
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            section, key = field_name.split(".", 1)
            overrides.setdefault(section, {})[key] = value
    if args.compile:
        train["compile"] = True
    if getattr(args, "bitnet", False):
        train["bitnet"] = True
    if getattr(args, "lora", False) or getattr(args, "dora", False):  # any lora.* setting turns LoRA on
        overrides.setdefault("lora", {})
    if getattr(args, "dora", False):
        overrides["lora"]["dora"] = True
    file = dict(file if file is not None else read_config_file(args.config) if args.config else {})
    preset_name = args.preset or (str(file["preset"]) if file.get("preset") is not None else None)
    file.pop("preset", None)
    cfg = load_config(None, preset_name, base=base)
    if file:
        cfg = RunConfig.from_dict(file, base=cfg)
    return RunConfig.from_dict(overrides, base=cfg)


def report_run(summary: dict) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return
    val = summary["val"]
    if val:
        print(f"validation loss {val[0][1]:.3f} (step {val[0][0]}) -> {val[-1][1]:.3f} (step {val[-1][0]})")
    print(f"stopped ({summary['stopped']}) at step {summary['step']}; checkpoint {summary['checkpoint']}")


def cmd_pretrain(args) -> None:
    from babyllama.train.pretrain import PretrainJob, pretrain

    saved = Path(args.out) / RUN_CONFIG
    if args.resume and not (args.config or args.preset) and saved.is_file():
        args.config = str(saved)  # resuming: the run's own config, with only the flags given now on top
    cfg = run_config(args)
    long_context_defaults(args, cfg)
    summary = pretrain(PretrainJob(data=args.data, out=args.out, config=cfg, resume=args.resume, init=args.init,
                                   tokenizer=args.tokenizer, stop_at_step=args.stop_at_step,
                                   overwrite=args.overwrite, allow_unverified=args.allow_unverified))
    report_run(summary)


def long_context_defaults(args, cfg) -> None:
    """--s2-attn without a group size: a quarter of the training length (LongLoRA's choice); with
    LoRA and no --lora-train, norms and embeddings train too, as LongLoRA found they must."""
    if not getattr(args, "s2_attn", False):
        return
    if not cfg.train.s2_group_size:
        cfg.train.s2_group_size = max(2, cfg.model.max_seq_len // 4 // 2 * 2)
    if cfg.lora is not None and not cfg.lora.train and args.lora_train is None:
        cfg.lora.train = ("norms", "embeddings")


def sft_run_config(args, defaults=None):
    """The fine-tuning settings ([train], and [lora] with --lora): the stage's defaults (`defaults(lora)`,
    SFT's unless given; LoRA's with --lora; or, resuming without --config/--preset, the run's own)
    <- --preset/--config <- flags. The model comes from --ckpt: `--set model.*` is refused and a
    [model] table in --config is ignored with a warning, before anything is loaded."""
    from babyllama.config import ConfigError, RunConfig

    for pair in args.set:
        if pair.split("=", 1)[0].strip().startswith("model."):
            raise ConfigError(f"--set {pair}: sft takes the model from --ckpt, so model.* cannot be set "
                              f"here (for dropout while fine-tuning use --dropout)")
    file = read_config_file(args.config) if args.config else {}
    if "model" in file:
        warnings.warn(f"{args.config}: its [model] table is ignored: sft takes the model from --ckpt "
                      f"(--dropout sets dropout while fine-tuning)")
        file.pop("model")
    if defaults is None:
        from babyllama.finetune.sft import default_sft_train as defaults

    saved = Path(args.out) / RUN_CONFIG
    own = {}
    if args.resume and not (args.config or args.preset) and saved.is_file():
        # resuming: the run's own settings, with only the flags given now on top
        own = {k: v for k, v in read_config_file(saved).items() if k in ("train", "lora")}
    cfg = None
    for lora in (False, True):  # LoRA's defaults (its learning rate) once LoRA turns out to be on
        base = RunConfig.from_dict(own, base=RunConfig(train=defaults(lora)))
        cfg = run_config(args, base=base, file=file)
        if cfg.lora is None or lora:
            return cfg
    return cfg


def cmd_sft(args) -> None:
    cfg = sft_run_config(args)
    from babyllama.finetune.sft import SFTJob, sft

    summary = sft(SFTJob(ckpt=args.ckpt, data=args.data, out=args.out, train=cfg.train, lora=cfg.lora, layout=args.layout,
                         val_fraction=args.val_fraction, resume=args.resume, on_error=args.on_error,
                         pack=args.pack, stop_at_step=args.stop_at_step, dropout=args.dropout,
                         overwrite=args.overwrite, allow_unverified=args.allow_unverified, encoding=args.encoding))
    report_run(summary)


def add_parsers(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model on prepared shards")
    p.add_argument("--data", required=True, help="directory written by `babyllama data pretrain`")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--init", metavar="CKPT", help="start from these weights (new optimizer and schedule)")
    p.add_argument("--tokenizer", help="check that the shards were made with this tokenizer")
    add_run_flags(p)
    add_config_flags(p)
    add_lora_flags(p, "continued pretraining from --init")
    g = add_rope_flags(p, training=True)
    g.add_argument("--seq-len", type=int, metavar="N",
                   help="training length (model.max_seq_len); longer than --init's for a long-context fine-tune")
    g.add_argument("--s2-attn", action="store_true",
                   help="LongLoRA's shifted sparse attention while training (full attention at inference); "
                        "groups of a quarter of --seq-len unless --s2-group-size; with --lora, norms and "
                        "embeddings train too")
    g.add_argument("--s2-group-size", type=int, metavar="G", help="tokens per attention group (train.s2_group_size)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (loss on assistant replies only)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SFT_LAYOUTS_HELP)
    p.add_argument("--ckpt", required=True, help="pretrained run directory or checkpoint to start from (the model)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="SFT files (FILE or FILE::LAYOUT) or directories written by `babyllama data sft`")
    p.add_argument("--out", required=True, help="run directory for the fine-tuned model")
    add_layout_flag(p, _sft_job)
    p.add_argument("--val-fraction", type=float, default=Default(_sft_job, "val_fraction"),
                   help="share of conversations held out (default %(default)s)")
    add_on_error_flag(p, _sft_job)
    p.add_argument("--dropout", type=float, help="dropout while fine-tuning (default: the model's, usually 0)")
    p.add_argument("--pack", action="store_true",
                   help="pack several short conversations into each row of max_seq_len tokens (they never "
                        "attend to each other); --batch-size then counts rows")
    add_encoding_flag(p, _sft_job)
    add_run_flags(p)
    add_config_flags(p, model=False)
    add_lora_flags(p, "fine-tuning")
    p.set_defaults(func=cmd_sft)
