"""Our Llama as a stock Hugging Face `LlamaForCausalLM`: the same weights, renamed and unfused.

RoPE already uses HF's half-split layout, so no permutation is needed: only `wqkv` is split into
q/k/v and `w13` into gate/up. A RoPE scaling becomes `rope_parameters` where transformers has the
same formula (static NTK is a plain larger rope_theta there); CLEX, learned, has none and is refused.
"""

from __future__ import annotations

import torch

from babyllama.config import ConfigError, ModelConfig


def hf_rope(cfg: ModelConfig) -> tuple[dict, int]:
    """(transformers' `rope_parameters`, `max_position_embeddings`) computing our rotary tables."""
    from babyllama.model.rope import ntk_theta

    kind, factor, original = cfg.rope_scaling, cfg.rope_factor, cfg.trained_len
    if kind == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}, cfg.max_seq_len
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": cfg.rope_theta}, cfg.max_seq_len
    if kind == "ntk":  # static NTK-aware scaling is a larger base
        return {"rope_type": "default", "rope_theta": ntk_theta(cfg.rope_theta, cfg.head_dim, factor)}, cfg.max_seq_len
    if kind == "dynamic-ntk":  # transformers grows the base past max_position_embeddings: the original length
        return {"rope_type": "dynamic", "factor": factor, "rope_theta": cfg.rope_theta}, original
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow,
                "rope_theta": cfg.rope_theta}, cfg.max_seq_len
    raise ConfigError(f"RoPE scaling {kind!r} has no equivalent in transformers (its frequencies are learned, "
                      f"not a formula): export a model with linear, ntk, dynamic-ntk, yarn or no scaling")


def hf_config(cfg: ModelConfig, **extra):
    import transformers

    rope, max_positions = hf_rope(cfg)
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, **extra)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        wqkv = layer.attention.wqkv.weight
        sd[p + "self_attn.q_proj.weight"] = wqkv[:q]
        sd[p + "self_attn.k_proj.weight"] = wqkv[q:q + kv]
        sd[p + "self_attn.v_proj.weight"] = wqkv[q + kv:]
        sd[p + "self_attn.o_proj.weight"] = layer.attention.wo.weight
        gate, up = layer.feed_forward.w13.weight.split(cfg.hidden_dim)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
        sd[p + "mlp.down_proj.weight"] = layer.feed_forward.w2.weight
        sd[p + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_hf_model(model, **config_extra):
    """A `transformers.LlamaForCausalLM` (eval mode) computing the same logits as `model`."""
    import transformers

    hf = transformers.LlamaForCausalLM(hf_config(model.config, **config_extra)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight names do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.to(next(model.parameters()).dtype)


# --- the other way: a Hugging Face Llama checkpoint as our model ---------------------------------

def model_config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a transformers Llama config.json; what our model does not compute is refused."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{where}: {why}; babyllama imports Llama-architecture models (LlamaForCausalLM)")

    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise refuse(f"model_type {cfg.get('model_type')!r}, architectures {archs}")
    for key, plain in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"),
                       ("pretraining_tp", 1)):
        if cfg.get(key, plain) != plain:
            raise refuse(f"{key} = {cfg[key]!r} (ours: {plain!r})")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // heads):
        raise refuse(f"head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads = {dim // heads}")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    positions = cfg.get("max_position_embeddings", 2048)
    scaling: dict = {}
    if kind == "linear":
        scaling = dict(rope_scaling="linear", rope_factor=float(rope["factor"]))
    elif kind == "dynamic":  # grows the base past max_position_embeddings, which is the trained length
        scaling = dict(rope_scaling="dynamic-ntk", rope_factor=float(rope["factor"]), rope_original_len=positions)
        positions = int(positions * rope["factor"])
    elif kind == "yarn":
        extra = set(rope) - {"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast",
                             "beta_slow", "rope_theta"}
        if extra:
            raise refuse(f"YaRN settings {sorted(extra)} (ours: factor, original length, beta_fast, beta_slow)")
        scaling = dict(rope_scaling="yarn", rope_factor=float(rope["factor"]),
                       rope_original_len=int(rope.get("original_max_position_embeddings", positions)),
                       rope_beta_fast=float(rope.get("beta_fast", 32.0)), rope_beta_slow=float(rope.get("beta_slow", 1.0)))
    elif kind != "default":
        raise refuse(f"RoPE type {kind!r} (ours: default, linear, dynamic, yarn)")
    return ModelConfig(vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=cfg.get("num_key_value_heads") or heads, hidden_dim=cfg["intermediate_size"],
                       max_seq_len=positions, norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), **scaling)


def state_dict_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names and fused projections from a transformers Llama's tensors (float32)."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConfigError(f"the checkpoint has no tensor {name!r}; is it a LlamaForCausalLM?")
        return hf.pop(name).float()

    sd = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if "lm_head.weight" in hf and not cfg.tie_embeddings:
        sd["output.weight"] = take("lm_head.weight")
    elif not cfg.tie_embeddings:
        raise ConfigError("the checkpoint has no lm_head.weight and does not tie it to the embedding")
    hf.pop("lm_head.weight", None)  # a tied copy
    for i in range(cfg.n_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        sd[ours + "attention.wqkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        sd[ours + "attention.wo.weight"] = take(p + "self_attn.o_proj.weight")
        sd[ours + "feed_forward.w13.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        sd[ours + "feed_forward.w2.weight"] = take(p + "mlp.down_proj.weight")
        sd[ours + "attention_norm.weight"] = take(p + "input_layernorm.weight")
        sd[ours + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ConfigError(f"tensors babyllama cannot place: {leftover[:3]}{' ...' if len(leftover) > 3 else ''}")
    return sd
