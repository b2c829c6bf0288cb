"""Our model against transformers' LlamaForCausalLM with the same weights: an independent reference
for RMSNorm, RoPE layout, GQA and SwiGLU (and the basis of exporting as a stock Llama later)."""

import pytest
import torch

from babyllama.model import Llama
from tests.conftest import tiny_model_config

transformers = pytest.importorskip("transformers")


def to_hf(model: Llama):
    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output_weight}
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
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    return hf


@pytest.mark.parametrize("tie,n_kv", [(True, 2), (False, 4)])
def test_logits_match_transformers_llama(tie, n_kv):
    model = Llama(tiny_model_config(tie_embeddings=tie, n_kv_heads=n_kv)).eval()
    with torch.no_grad():  # random norm gains, so the norms are really compared too
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf = to_hf(model)
    tokens = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)
