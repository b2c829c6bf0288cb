"""Our LoRA/DoRA adapters in PEFT's files, both ways.

An adapter checkpoint of ours is a PEFT adapter directory: `adapter_config.json` and
`adapter_model.safetensors` with PEFT's tensor names for the Hugging Face Llama modules, so

    PeftModel.from_pretrained(our_model_exported_to_transformers, "RUN/checkpoints/step-N")

gives our logits, and a PEFT adapter trained on such an export loads here (`babyllama lora import`).
Our fused projections need no arithmetic: each target owns its slice's A and B (adapters/lora.py),
which are exactly PEFT's q_proj, k_proj, ... matrices, so converting is renaming:

    layers.3.attention.wqkv.lora_A.q         base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
    layers.3.feed_forward.w13.lora_B.up      base_model.model.model.layers.3.mlp.up_proj.lora_B.weight
    layers.3.attention.wo.lora_magnitude.o   base_model.model.model.layers.3.self_attn.o_proj.lora_magnitude_vector
    layers.3.attention_norm.weight           base_model.model.model.layers.3.input_layernorm.weight  (modules_to_save)
    tok_embeddings.weight                    base_model.model.model.embed_tokens.weight              (modules_to_save)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from babyllama.adapters.lora import PROJECTIONS
from babyllama.config import LORA_TARGETS as TARGETS, ConfigError, LoraConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "head": "lm_head"}
TARGET_OF = {module.split(".")[-1]: target for target, module in HF_MODULE.items()}  # q_proj -> q
PROJECTION_OF = {t: p for p, ts in PROJECTIONS.items() for t in ts}  # q -> attention.wqkv
PROJECTION_OF["head"] = "output"
# fully trained modules (PEFT's modules_to_save): ours -> theirs, with the layer index as {}
SAVED = {"layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
         "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
         "norm.weight": "model.norm.weight", "tok_embeddings.weight": "model.embed_tokens.weight",
         # trained rows of the embedding (PEFT's trainable_token_indices): the new rows, not a difference
         "tok_embeddings.rows": "model.embed_tokens.token_adapter.trainable_tokens_delta"}
TIED_HEAD = PREFIX + "lm_head.weight"
SAVED_MODULES = {"norms": ["input_layernorm", "post_attention_layernorm", "norm"], "embeddings": ["embed_tokens"]}
_OURS = re.compile(r"layers\.(\d+)\.(attention\.wqkv|attention\.wo|feed_forward\.w13|feed_forward\.w2)\."
                   r"(lora_A|lora_B|lora_magnitude)\.(\w+)")
_THEIRS = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")


def _saved_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


_HEAD_KINDS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def to_peft_name(name: str) -> str:
    if name.startswith("output.") and name.endswith(".head"):  # LoRA on the LM head: PEFT's lm_head
        return f"{PREFIX}lm_head.{_HEAD_KINDS[name.split('.')[1]]}"
    m = _OURS.fullmatch(name)
    if m:
        layer, _, kind, target = m.groups()
        suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}[kind]
        return f"{PREFIX}model.layers.{layer}.{HF_MODULE[target]}.{suffix}"
    for ours, theirs in SAVED.items():
        m = _saved_pattern(ours).fullmatch(name)
        if m:
            return PREFIX + theirs.format(*m.groups())
    raise ConfigError(f"{name}: no PEFT name for this parameter (only LoRA/DoRA matrices, norms and the "
                      f"embedding are saved in an adapter)")


def from_peft_name(name: str) -> str:
    plain = name.removeprefix(PREFIX)
    for ours, theirs in _HEAD_KINDS.items():
        if plain == f"lm_head.{theirs}":
            return f"output.{ours}.head"
    m = _THEIRS.fullmatch(plain)
    if m and m.group(3) in TARGET_OF:
        layer, _, module, kind = m.groups()
        target = TARGET_OF[module]
        ours = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude"}[kind]
        return f"layers.{layer}.{PROJECTION_OF[target]}.{ours}.{target}"
    for ours, theirs in SAVED.items():
        m = _saved_pattern(theirs).fullmatch(plain)
        if m:
            return ours.format(*m.groups())
    raise ConfigError(f"{name}: a tensor babyllama cannot place (it takes LoRA/DoRA on q/k/v/o/gate/up/down_proj, "
                      f"and norms or embed_tokens as modules_to_save)")


def peft_config(settings: dict[str, Any], model_config, base: str | None) -> dict[str, Any]:
    """adapter_config.json for our LoRA settings (the fields PEFT reads; it fills the rest)."""
    saved = [m for extra in settings.get("train", []) for m in SAVED_MODULES[extra]]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": settings["rank"], "lora_alpha": settings["alpha"], "lora_dropout": settings["dropout"],
            "target_modules": sorted(HF_MODULE[t].split(".")[-1] for t in settings["targets"]),
            "use_dora": settings["dora"], "use_rslora": settings["rslora"], "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": saved or None, "trainable_token_indices": settings.get("token_rows") or None,
            # a trained embedding must stay tied to the LM head in PEFT too, as it is in our model
            "ensure_weight_tying": bool(model_config.tie_embeddings and "embeddings" in settings.get("train", []))}


def save_peft(directory: Path, weights: dict[str, torch.Tensor], model_config, settings: dict[str, Any],
              base: str | None) -> None:
    tensors = {to_peft_name(k): v.detach().to("cpu").contiguous() for k, v in weights.items()}
    if model_config.tie_embeddings and "tok_embeddings.weight" in weights:  # PEFT keeps the tied head's copy too
        tensors[TIED_HEAD] = tensors[PREFIX + SAVED["tok_embeddings.weight"]].clone()
    save_file(tensors, str(Path(directory) / WEIGHTS), metadata={"format": "pt"})
    (Path(directory) / CONFIG).write_text(json.dumps(peft_config(settings, model_config, base), indent=2),
                                          encoding="utf-8")


def load_peft_weights(directory: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors with our parameter names."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{directory}: no {WEIGHTS} (a PEFT adapter directory has it; .bin adapters are "
                          f"pickles, which babyllama does not load)")
    tensors = load_file(str(path))
    if TIED_HEAD in tensors and PREFIX + SAVED["tok_embeddings.weight"] in tensors:
        tensors.pop(TIED_HEAD)  # the copy of a trained, tied embedding (ensure_weight_tying)
    return {from_peft_name(k): v for k, v in tensors.items()}


def settings_from_peft(directory: Path) -> dict[str, Any]:
    """Our LoRA settings from a PEFT adapter_config.json; what we cannot reproduce exactly is refused."""
    path = Path(directory) / CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a PEFT adapter config ({e})") from None

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{path}: {why}; babyllama loads plain LoRA/DoRA adapters on a Llama's projections")

    if cfg.get("peft_type") != "LORA":
        raise refuse(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, plain in (("bias", "none"), ("fan_in_fan_out", False), ("lora_bias", False), ("rank_pattern", {}),
                       ("alpha_pattern", {}), ("layers_to_transform", None), ("layer_replication", None),
                       ("target_parameters", None)):
        if cfg.get(key) is not None and cfg.get(key) != plain:
            raise refuse(f"{key} = {cfg.get(key)!r} is not supported")
    targets = cfg.get("target_modules")
    if targets == "all-linear":
        targets = [HF_MODULE[t].split(".")[-1] for t in TARGETS]
    if isinstance(targets, str):
        targets = [targets]
    unknown = [t for t in targets or [] if t.split(".")[-1] not in TARGET_OF]
    if unknown or not targets:
        raise refuse(f"target_modules {unknown or targets} are not among {', '.join(TARGET_OF)}")
    saved = cfg.get("modules_to_save") or []
    extras = [extra for extra, modules in SAVED_MODULES.items() if any(m in saved for m in modules)]
    strange = [m for m in saved if not any(m in modules for modules in SAVED_MODULES.values())]
    if strange:
        raise refuse(f"modules_to_save {strange} are not norms or embed_tokens")
    rows = cfg.get("trainable_token_indices") or []
    if isinstance(rows, dict):
        if set(rows) - {"embed_tokens"}:
            raise refuse(f"trainable_token_indices for {sorted(set(rows) - {'embed_tokens'})} (only embed_tokens)")
        rows = rows.get("embed_tokens", [])
    config = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                        targets=tuple(TARGET_OF[t.split(".")[-1]] for t in targets), dora=bool(cfg.get("use_dora")),
                        rslora=bool(cfg.get("use_rslora")), train=tuple(extras))
    return {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout, "targets": list(config.targets),
            "dora": config.dora, "rslora": config.rslora, "train": list(config.train),
            "token_rows": sorted(int(r) for r in rows)}
