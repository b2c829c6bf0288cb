"""Typed configuration: one dataclass per concern, presets, and TOML files that override them.

A run is described by a `RunConfig` (model shape + training settings). Presets are plain
`RunConfig` values; a TOML file (`--config`) or `--set section.key=value` overrides any field.
`configs/*.toml` in the repository are these presets written out, for users to copy and edit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message says which and why."""


# Command-line flags that set a field directly (`--set section.key=value` sets any field).
FLAGS = {
    "train.max_steps": "--max-steps", "train.batch_size": "--batch-size", "train.grad_accum": "--grad-accum",
    "train.lr": "--lr", "train.device": "--device", "train.dtype": "--dtype", "train.max_minutes": "--max-minutes",
    "train.seed": "--seed", "train.parallel": "--parallel", "train.deepspeed": "--deepspeed",
    "lora.rank": "--lora-rank", "lora.alpha": "--lora-alpha", "lora.dropout": "--lora-dropout",
    "lora.targets": "--lora-targets", "lora.train": "--lora-train", "lora.tokens": "--lora-tokens",
    "model.max_seq_len": "--seq-len", "model.rope_scaling": "--rope-scaling", "model.rope_factor": "--rope-factor",
    "model.rope_original_len": "--original-max-len", "train.s2_group_size": "--s2-group-size",
}
# RoPE scalings for a longer context (model/rope.py has the formulas); dynamic ones follow the length
ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic-ntk", "yarn", "clex")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DEVICE_SYNTAX = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PARALLEL = ("ddp", "fsdp")
IGNORE_INDEX = -100  # data writes it as the label of positions without loss; the loss skips them


def _refuse(name: str, rule: str, value: Any, note: str = "") -> ConfigError:
    flag = f" ({FLAGS[name]})" if name in FLAGS else ""
    return ConfigError(f"{name} must be {rule}{note}, got {value!r}{flag}")


def check_int(name: str, value: Any, low: int, high: int | None = None, note: str = "") -> None:
    """`value` is an integer in [low, high] (high None: no upper bound), else a ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(name, "an integer", value)
    if value < low or (high is not None and value > high):
        raise _refuse(name, f">= {low}" if high is None else f"an integer in [{low}, {high}]", value, note)


def check_float(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = False, note: str = "") -> None:
    """`value` is a finite number within the bounds (open or closed), else a ConfigError naming `name`.
    NaN and the infinities are always refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(name, "a number", value)
    if high is None:
        rule = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        rule = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    ok = (isinstance(value, int) or math.isfinite(value)) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise _refuse(name, rule, value, note)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _refuse(name, "one of " + ", ".join(choices), value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _refuse(name, "true or false", value)


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _refuse(name, "a string", value)


@dataclass
class ModelConfig:
    """Shape of a Llama-2 style decoder. `vocab_size` is filled from the tokenizer when left at 0."""

    vocab_size: int = 0
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 0  # 0 means n_heads (plain multi-head attention); fewer gives grouped-query attention
    hidden_dim: int = 0  # SwiGLU width; 0 picks Llama's rule (8/3 * dim rounded up to multiple_of)
    multiple_of: int = 32
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    # longer context than trained: none | linear | ntk | dynamic-ntk | yarn | clex (model/rope.py)
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # how many times the original length (clex: the largest scale trained)
    rope_original_len: int = 0  # the length the model was trained at before scaling; 0 = max_seq_len
    rope_beta_fast: float = 32.0  # YaRN: dimensions turning more often than this over the original length are kept
    rope_beta_slow: float = 1.0  # YaRN: dimensions turning less often than this are fully interpolated

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Range-check every field (ConfigError naming it), fill the derived fields left at 0, check
        that the shape fits together. Call again after changing a field (e.g. vocab_size)."""
        check_int("model.vocab_size", self.vocab_size, 0, note=" (0 = from the tokenizer)")
        check_int("model.dim", self.dim, 1)
        check_int("model.n_layers", self.n_layers, 1)
        check_int("model.n_heads", self.n_heads, 1)
        check_int("model.n_kv_heads", self.n_kv_heads, 0, note=" (0 = model.n_heads)")
        check_int("model.hidden_dim", self.hidden_dim, 0, note=" (0 = from model.dim)")
        check_int("model.multiple_of", self.multiple_of, 1)
        check_int("model.max_seq_len", self.max_seq_len, 2)
        check_float("model.norm_eps", self.norm_eps, 0, low_open=True)
        check_float("model.rope_theta", self.rope_theta, 0, low_open=True)
        _check_bool("model.tie_embeddings", self.tie_embeddings)
        check_float("model.dropout", self.dropout, 0, 1, high_open=True)
        _check_choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check_float("model.rope_factor", self.rope_factor, 1)
        check_int("model.rope_original_len", self.rope_original_len, 0, note=" (0 = model.max_seq_len)")
        check_float("model.rope_beta_fast", self.rope_beta_fast, 0, low_open=True)
        check_float("model.rope_beta_slow", self.rope_beta_slow, 0, low_open=True)
        if self.rope_beta_slow > self.rope_beta_fast:
            raise ConfigError(f"model.rope_beta_slow ({self.rope_beta_slow}) must not exceed model.rope_beta_fast "
                              f"({self.rope_beta_fast})")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim == 0:
            hidden = (8 * self.dim) // 3  # 2/3 of 4 * dim, in integers (no float overflow)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"model.dim / model.n_heads (the head dimension) must be even for rotary embeddings, "
                              f"got {self.dim} / {self.n_heads} = {self.dim // self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def trained_len(self) -> int:
        """The context the weights were trained at before any RoPE scaling."""
        return self.rope_original_len or self.max_seq_len

    def with_rope_scaling(self, kind: str, factor: float = 1.0, original: int | None = None,
                          max_seq_len: int | None = None) -> "ModelConfig":
        """A copy scaled for a longer context. `original` defaults to the length these weights were
        trained at (recorded, never guessed); the context becomes `max_seq_len`, by default the
        larger of the current one and original x factor."""
        original = original or self.trained_len
        if max_seq_len is None:
            max_seq_len = max(self.max_seq_len, math.ceil(original * factor)) if kind != "none" else self.max_seq_len
        return dataclasses.replace(self, rope_scaling=kind, rope_factor=float(factor), max_seq_len=max_seq_len,
                                   rope_original_len=original if kind != "none" else 0)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shape (matches the built model)."""
        d, h, L = self.dim, self.hidden_dim, self.n_layers
        kv = self.n_kv_heads * self.head_dim
        per_layer = d * (d + 2 * kv) + d * d + 3 * d * h + 2 * d
        total = L * per_layer + d  # + final norm
        emb = self.vocab_size * d
        if include_embedding:
            total += emb if self.tie_embeddings else 2 * emb
        elif not self.tie_embeddings:
            total += emb  # the untied LM head is a matmul, not a lookup
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 * matmul params + attention scores."""
        seq_len = seq_len or self.max_seq_len
        matmul_params = self.num_params(include_embedding=False) + (self.vocab_size * self.dim if self.tie_embeddings else 0)
        attention = 6 * self.n_layers * self.dim * seq_len  # QK^T and AV, causal half counted in full as is customary
        return 6 * matmul_params + attention


@dataclass
class RopeScaling:
    """A RoPE scaling chosen when a trained model is used (--rope-scaling, --rope-factor,
    --original-max-len): it replaces the one the checkpoint records. `original` None: the length
    the checkpoint was trained at; `max_len` None: original x factor (or the model's, if longer)."""

    kind: str
    factor: float = 1.0
    original: int | None = None
    max_len: int | None = None

    def __post_init__(self) -> None:
        _check_choice("--rope-scaling", self.kind, ROPE_SCALINGS)
        check_float("--rope-factor", self.factor, 1)
        if self.original is not None:
            check_int("--original-max-len", self.original, 2)
        if self.max_len is not None:
            check_int("the context length", self.max_len, 2)
        if self.kind != "none" and self.factor == 1 and self.kind != "clex":
            raise ConfigError(f"--rope-scaling {self.kind} needs --rope-factor > 1 (how many times the "
                              f"trained length to reach)")

    def apply(self, cfg: "ModelConfig") -> "ModelConfig":
        return cfg.with_rope_scaling(self.kind, self.factor, self.original, self.max_len)


@dataclass
class TrainConfig:
    """Everything the one training loop needs besides the model shape."""

    batch_size: int = 8  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps; the schedule is counted in these
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_ckpts: int = 2
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    parallel: str = "ddp"  # ddp | fsdp: how several processes (torchrun) share the work
    deepspeed: str = ""  # a DeepSpeed JSON config: use its ZeRO engine instead of ddp/fsdp
    max_minutes: float = 0.0  # stop (with a checkpoint) after this many minutes; 0 = no limit
    tensorboard: bool = False
    # LongLoRA's shifted sparse attention while training: groups of this many tokens (0 = full attention)
    s2_group_size: int = 0
    # BitNet b1.58: train the blocks' projections as ternary weights (quant/bitnet.py), for `quantize --method bitnet`
    bitnet: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Range-check every field (ConfigError naming the field and its flag). Call again after
        changing a field."""
        for name in ("batch_size", "grad_accum", "max_steps"):
            check_int(f"train.{name}", getattr(self, name), 1)
        check_float("train.lr", self.lr, 0, low_open=True)
        check_float("train.min_lr", self.min_lr, 0)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr must be <= train.lr ({self.lr}), got {self.min_lr}")
        check_int("train.warmup_steps", self.warmup_steps, 0)
        check_float("train.weight_decay", self.weight_decay, 0)
        check_float("train.beta1", self.beta1, 0, 1, high_open=True)
        check_float("train.beta2", self.beta2, 0, 1, high_open=True)
        check_float("train.grad_clip", self.grad_clip, 0, note=" (0 = no clipping)")
        for name in ("eval_interval", "eval_batches", "log_interval", "ckpt_interval"):
            check_int(f"train.{name}", getattr(self, name), 1)
        check_int("train.keep_ckpts", self.keep_ckpts, 0, note=" (0 = keep all)")
        check_int("train.seed", self.seed, 0, 2**32 - 1)
        _check_str("train.device", self.device)
        if not DEVICE_SYNTAX.fullmatch(self.device):
            raise _refuse("train.device", "auto, cpu, cuda, cuda:N or mps", self.device)
        _check_choice("train.dtype", self.dtype, DTYPES)
        _check_bool("train.compile", self.compile)
        _check_choice("train.parallel", self.parallel, PARALLEL)
        _check_str("train.deepspeed", self.deepspeed)
        check_float("train.max_minutes", self.max_minutes, 0, note=" (0 = no limit)")
        _check_bool("train.tensorboard", self.tensorboard)
        check_int("train.s2_group_size", self.s2_group_size, 0, note=" (0 = full attention)")
        if self.s2_group_size % 2:
            raise ConfigError(f"train.s2_group_size must be even (half a group is the shift), got {self.s2_group_size}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "head")  # the projections LoRA can adapt
# every linear layer, as QLoRA found needed to match full fine-tuning, and the LM head: on our small
# models the frozen (tied) head is what held LoRA back (demo sentiment task, README "LoRA")
DEFAULT_LORA_TARGETS = LORA_TARGETS
LORA_EXTRAS = ("norms", "embeddings")  # trained in full besides the adapters, when asked (LongLoRA trains both)


def parse_list(value: str | list | tuple, known: tuple[str, ...], flag: str) -> list[str]:
    """'q,v' or ['q', 'v'] -> ['q', 'v'] in the canonical order; unknown names refused by name."""
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s).strip() for s in value]
    items = [s for s in items if s]
    if "all" in items:
        items = list(known)
    unknown = [s for s in items if s not in known]
    if unknown:
        raise ConfigError(f"{flag}: unknown {', '.join(map(repr, unknown))} (choose from {', '.join(known)}, or all)")
    return [s for s in known if s in items]


@dataclass
class LoraConfig:
    """What `--lora` trains. `targets`: the projections that get adapters (q, k, v, o, gate, up,
    down); `train`: what trains in full besides them (norms, embeddings)."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank (2 at the defaults)
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dora: bool = False
    rslora: bool = False  # scale by alpha / sqrt(rank) instead (rank-stabilised LoRA)
    train: tuple[str, ...] = ()
    # embedding rows trained too: "chat" = the chat markers (<|im_start|>, <|im_end|>) when the data is
    # conversations (SFT), which pretraining never showed the model; "none"; or token ids "4,5"
    tokens: str = "chat"

    def __post_init__(self) -> None:
        _check_bool("lora.dora", self.dora)
        _check_bool("lora.rslora", self.rslora)
        check_int("lora.rank", self.rank, 1)
        check_float("lora.alpha", self.alpha, 0, low_open=True)
        check_float("lora.dropout", self.dropout, 0, 1, high_open=True)
        self.targets = tuple(parse_list(self.targets, LORA_TARGETS, "--lora-targets"))
        self.train = tuple(parse_list(self.train, LORA_EXTRAS, "--lora-train"))
        if not self.targets:
            raise ConfigError("--lora-targets: name at least one projection (q, k, v, o, gate, up, down)")
        _check_str("lora.tokens", self.tokens)
        if self.tokens not in ("chat", "none") and not all(t.strip().isdigit() for t in self.tokens.split(",")):
            raise ConfigError(f"--lora-tokens must be chat, none or comma-separated token ids, got {self.tokens!r}")

    def token_rows(self, chat_ids: tuple[int, ...] = ()) -> list[int]:
        """The embedding rows to train: `chat_ids` (the stage's chat markers) for "chat", else the ids given."""
        if self.tokens == "none" or "embeddings" in self.train:  # all rows train already
            return []
        if self.tokens == "chat":
            return sorted(set(chat_ids))
        return sorted({int(t) for t in self.tokens.split(",")})

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig | None = None  # train LoRA/DoRA adapters instead of every weight (--lora)

    def validate(self) -> None:
        """Check both parts again, e.g. after a stage filled model.vocab_size from the tokenizer."""
        self.model.validate()
        self.train.validate()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.lora is None:
            data.pop("lora")
        else:
            data["lora"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["lora"].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "RunConfig | None" = None) -> "RunConfig":
        base = base or cls()
        template = base.to_dict()
        if "lora" in data and "lora" not in template:  # a [lora] table turns LoRA on, from its defaults
            template["lora"] = RunConfig(lora=LoraConfig()).to_dict()["lora"]
        merged = merge_dict(template, data, where="config")
        model = merged["model"]
        # derived fields are recomputed unless the user set them explicitly
        if "model" in data and "hidden_dim" not in data["model"] and any(k in data["model"] for k in ("dim", "multiple_of")):
            model["hidden_dim"] = 0
        if "model" in data and "n_kv_heads" not in data["model"] and "n_heads" in data["model"]:
            model["n_kv_heads"] = 0
        lora = LoraConfig(**merged["lora"]) if "lora" in merged else None
        return cls(model=ModelConfig(**model), train=TrainConfig(**merged["train"]), lora=lora)

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def merge_dict(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    """Override `base` with `override`, refusing unknown keys and wrong types with a clear message."""
    out = dict(base)
    for key, value in override.items():
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"{where}: unknown key '{key}' (known: {known})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be a table")
            out[key] = merge_dict(base[key], value, f"{where}.{key}")
        else:
            out[key] = _coerce(base[key], value, f"{where}.{key}")
    return out


def _coerce(default: Any, value: Any, where: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if isinstance(default, str):
        return str(value)
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-3", "model.dim=256"] into a nested dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise ConfigError(f"--set expects section.key=value, got {pair!r}")
        dotted, value = pair.split("=", 1)
        section, key = dotted.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


PRESETS: dict[str, RunConfig] = {
    # A few million parameters: trains at thousands of tokens/s on a laptop CPU.
    "tiny": RunConfig(
        model=ModelConfig(dim=256, n_layers=4, n_heads=4, max_seq_len=256),
        train=TrainConfig(batch_size=16, max_steps=2000, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                          eval_interval=100, eval_batches=10, ckpt_interval=200),
    ),
    # The original baby-llama2-chinese table: dim 512, 8 layers, 8 heads, seq 256 (58.5M params with ChatGLM2's vocab).
    "original": RunConfig(
        model=ModelConfig(dim=512, n_layers=8, n_heads=8, max_seq_len=256),
        train=TrainConfig(batch_size=32, grad_accum=4, max_steps=20000, lr=3e-4, min_lr=3e-5,
                          warmup_steps=1000, eval_interval=1000, ckpt_interval=1000),
    ),
    # ~125M parameters (GPT-2 small shape) for one modern GPU.
    "125m": RunConfig(
        model=ModelConfig(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
        train=TrainConfig(batch_size=16, grad_accum=8, max_steps=20000, lr=6e-4, min_lr=6e-5,
                          warmup_steps=1000, eval_interval=1000, ckpt_interval=1000, compile=True),
    ),
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from: {', '.join(PRESETS)})")
    return RunConfig.from_dict({}, base=PRESETS[name])


def load_config(path: str | Path | None = None, preset_name: str | None = None,
                overrides: dict[str, Any] | None = None, base: RunConfig | None = None) -> RunConfig:
    """Preset (default 'tiny'; or `base`, a stage's own defaults) <- TOML file <- command-line overrides."""
    cfg = RunConfig.from_dict({}, base=base) if base is not None and not preset_name else preset(preset_name or "tiny")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        data.pop("preset", None)
        cfg = RunConfig.from_dict(data, base=cfg)
    if overrides:
        cfg = RunConfig.from_dict(overrides, base=cfg)
    return cfg


def config_file_preset(path: str | Path) -> str | None:
    """A config file may name the preset it starts from with a top-level `preset = "name"`."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    value = data.get("preset")
    return str(value) if value is not None else None
