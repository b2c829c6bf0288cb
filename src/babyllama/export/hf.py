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
