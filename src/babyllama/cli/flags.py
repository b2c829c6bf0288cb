"""The flag groups several subcommands share, so that one concept has one flag, one meaning and one
default everywhere; and `Default`, which takes a flag's default from the Python config it fills.

Nothing here imports a stage (nor torch): `babyllama --help` and the data stages start at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

MAX_NEW_TOKENS = 200  # = babyllama.infer.sampling.MAX_NEW_TOKENS (not imported: it loads torch; tested equal)


class Default:
    """The default of a flag, read from a field of the dataclass the flag fills (`config()` returns
    the class; it imports it, so a stage is imported only when its help is shown or it runs). The
    CLI cannot then disagree with the Python API. Help texts show it with %(default)s; `Args`
    replaces it with its value when the command first reads it."""

    def __init__(self, config: Callable[[], type], field: str):
        self.config, self.field = config, field

    @property
    def value(self) -> Any:
        cls = self.config()
        for f in dataclasses.fields(cls):
            if f.name == self.field:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                break
        raise TypeError(f"{cls.__name__}.{self.field} has no default")

    def __str__(self) -> str:  # what --help shows
        return str(self.value)

    def __repr__(self) -> str:
        return f"Default({self.config.__name__}, {self.field!r})"


class Args(argparse.Namespace):
    """The parsed flags. A `Default` no flag overrode becomes its value when first read, so that
    checks a command makes before its stage is imported (sft's --set model.*) cost no import."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if isinstance(value, Default):
            value = value.value
            setattr(self, name, value)
        return value


# --- data preparation -------------------------------------------------------------------------

def add_encoding_flag(p: argparse.ArgumentParser, config: Callable[[], type]) -> None:
    """The encoding of input files (the stages that read corpora or SFT files)."""
    p.add_argument("--encoding", default=Default(config, "encoding"),
                   help="encoding of the input files (default %(default)s, with or without a byte-order mark); "
                        "Chinese corpora are often gb18030 (a superset of GBK)")


def add_overwrite_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} already in --out (never a directory that holds anything else)")


def add_layout_flag(p: argparse.ArgumentParser, config: Callable[[], type], where: str = "see above") -> None:
    """Where the text (or the conversation) is in each record: one flag name for every stage."""
    p.add_argument("--layout", default=Default(config, "layout"),
                   help=f"record layout of every input, unless given per file as FILE::LAYOUT "
                        f"(default %(default)s; {where})")


def add_on_error_flag(p: argparse.ArgumentParser, config: Callable[[], type]) -> None:
    p.add_argument("--on-error", choices=["raise", "skip"], default=Default(config, "on_error"),
                   help="malformed records: stop with file:line (raise) or skip and count them (skip); "
                        "default %(default)s")


# --- training ---------------------------------------------------------------------------------

def add_run_flags(p: argparse.ArgumentParser) -> None:
    """What a training stage does with an --out that already holds a run, and with checkpoints."""
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped (its run_config.toml supplies the "
                        "settings, with the flags given now on top)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run: its checkpoints and logs are deleted")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept checkpoints that have no checksums.json (not written by babyllama)")


def add_config_flags(p: argparse.ArgumentParser, model: bool = True) -> None:
    """The run configuration: preset <- --config file <- --set and the flags below. `model`: the
    stage builds its model from the configuration (pretrain); otherwise the model comes from
    --ckpt and only the [train] settings apply (sft)."""
    g = p.add_argument_group("configuration (preset <- --config file <- flags)")
    if model:
        g.add_argument("--preset", help="starting point: tiny (default), original (512/8/8, seq 256), 125m")
        g.add_argument("--config", help="TOML file overriding any field; see configs/*.toml")
        g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one field, e.g. --set train.lr=1e-3 --set model.n_layers=6 (repeatable)")
    else:
        g.add_argument("--preset", help="take the [train] settings of a preset (tiny, original, 125m) instead of "
                                        "the fine-tuning defaults")
        g.add_argument("--config", help="TOML file overriding [train] fields (a [model] table is ignored: "
                                        "the model comes from --ckpt)")
        g.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                       help="override one training field, e.g. --set train.warmup_steps=5 (repeatable); "
                            "the model comes from --ckpt (--dropout for its dropout)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch (train.batch_size)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (train.grad_accum)")
    g.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps (train.device)")
    g.add_argument("--dtype", help="auto (default: bf16 on GPUs that have it, float32 on CPUs), float32, "
                                   "bfloat16, float16 (train.dtype)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps after a warm-up)")
    g.add_argument("--bitnet", action="store_true",
                   help="BitNet b1.58 quantization-aware training: the blocks' projections compute with ternary "
                        "weights and int8 activations (train.bitnet); pack the run with `babyllama quantize --method bitnet`")
    g.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun with several processes: ddp (default; whole model per rank) or fsdp "
                        "(FSDP2: parameters, gradients and optimizer state sharded)")
    g.add_argument("--deepspeed", metavar="CONFIG.json",
                   help="train through DeepSpeed ZeRO with this config (stage etc.); batch, accumulation, "
                        "optimizer, clipping and precision are filled in from the babyllama settings")
    g.add_argument("--stop-at-step", type=int, metavar="N",
                   help="pause at step N with a checkpoint (the schedule still runs to --max-steps; --resume continues)")
    g.add_argument("--max-minutes", type=float,
                   help="a time budget: stop with a checkpoint after this many minutes of training (over resumes "
                        "too); the learning-rate decay follows the larger of steps done and time used, so it "
                        "has decayed when the time runs out")
    g.add_argument("--seed", type=int, help="random seed (train.seed)")


def add_lora_flags(p: argparse.ArgumentParser, what: str) -> None:
    """LoRA / DoRA: train small adapters over the frozen model (the same flags for every stage)."""
    g = p.add_argument_group(f"LoRA / DoRA ({what}; any of these turns LoRA on, like a [lora] table in --config)")
    g.add_argument("--lora", action="store_true",
                   help="train LoRA adapters only (checkpoints hold the adapter alone, in PEFT's format, "
                        "and name their base); defaults: rank 8, alpha 16, dropout 0.05, all projections, "
                        "and for sft a learning rate of 2e-3")
    g.add_argument("--dora", action="store_true", help="DoRA: LoRA plus a learned magnitude per output row")
    g.add_argument("--lora-rank", type=int, metavar="R", help="rank of the update (lora.rank, default 8)")
    g.add_argument("--lora-alpha", type=float, metavar="A",
                   help="the update is scaled by alpha / rank (lora.alpha, default 16)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the adapter's input (default 0.05)")
    g.add_argument("--lora-targets", metavar="LIST",
                   help="projections that get adapters: q,k,v,o,gate,up,down or all (default all)")
    g.add_argument("--lora-train", metavar="LIST",
                   help="also train these in full: norms, embeddings (default: nothing else)")
    g.add_argument("--lora-tokens", metavar="chat|none|IDS",
                   help="embedding rows that train too (default chat: sft trains the chat markers' rows, which "
                        "pretraining never saw; without them the model cannot learn to end its reply)")


# --- long context -----------------------------------------------------------------------------

ROPE_HELP = ("none (the angles extrapolate), linear (position interpolation), ntk (NTK-aware base), "
             "dynamic-ntk (NTK grown with the current length), yarn (NTK-by-parts + attention temperature), "
             "clex (learned, see `pretrain --rope-scaling clex`)")


def add_rope_flags(p: argparse.ArgumentParser, training: bool = False):
    """RoPE scaling for a longer context than trained: the same three flags for every stage that
    runs a model (model/rope.py has the formulas)."""
    g = p.add_argument_group("long context (RoPE scaling)")
    default = "none" if training else "the checkpoint's own"
    g.add_argument("--rope-scaling", metavar="KIND",
                   help=f"{ROPE_HELP} (default: {default})")
    g.add_argument("--rope-factor", type=float, metavar="F",
                   help="how many times the trained length to reach, e.g. 4 for 256 -> 1024 (clex: the largest "
                        "scale trained)")
    g.add_argument("--original-max-len", type=int, metavar="N",
                   help="the length the model was trained at (default: the one the checkpoint records; "
                        "never guessed)")
    return g


def rope_from_args(args):
    """The config.RopeScaling the flags ask for, or None (the checkpoint's own)."""
    if args.rope_scaling is None:
        if args.rope_factor is not None or args.original_max_len is not None:
            from babyllama.config import ConfigError

            raise ConfigError("--rope-factor and --original-max-len go with --rope-scaling KIND")
        return None
    from babyllama.config import RopeScaling

    return RopeScaling(args.rope_scaling, 1.0 if args.rope_factor is None else args.rope_factor,
                       args.original_max_len)


# --- inference --------------------------------------------------------------------------------

def _sampling_config() -> type:
    from babyllama.infer.sampling import SamplingConfig

    return SamplingConfig


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    """Where and how a model is loaded for generation, and how tokens are sampled: the same for
    every stage that generates (generate, chat)."""
    g = p.add_argument_group("inference")
    g.add_argument("--device", default="auto", help="auto (default: CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto",
                   help="weights' precision: auto (default: bf16 on GPUs that have it, else fp16; float32 on CPUs), "
                        "float32, bfloat16, float16")
    g.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    g.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help="tokens per reply at most (default %(default)s)")
    g.add_argument("--allow-unverified", action="store_true",
                   help="load a checkpoint that has no checksums.json (not written by babyllama)")
    g.add_argument("--no-compile", action="store_true",
                   help="decode without compiling the one-token step (models of 8M+ parameters compile it: "
                        "~10 s once, then ~25%% faster tokens; compiled code is cached on disk)")
    g.add_argument("--encoding", help="the encoding of text you type or pass (default: UTF-8; e.g. gbk)")
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=Default(_sampling_config, "temperature"),
                   help="0 = greedy (default %(default)s)")
    s.add_argument("--top-k", type=int, default=Default(_sampling_config, "top_k"),
                   help="0 disables (default %(default)s)")
    s.add_argument("--top-p", type=float, default=Default(_sampling_config, "top_p"),
                   help="1 disables (default %(default)s)")
    s.add_argument("--repetition-penalty", type=float, default=Default(_sampling_config, "repetition_penalty"),
                   help="1 disables (default %(default)s)")
    s.add_argument("--seed", type=int, help="make sampling reproducible")
    add_rope_flags(p)
