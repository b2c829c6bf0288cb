"""Our Llama as one GGUF file that llama.cpp (and Ollama) load as it is, architecture "llama".

Format decisions:

- Weights come from `hf_state_dict` (q/k/v and gate/up already unfused) under llama.cpp's names.
- RoPE: we rotate the two halves of a head together (Hugging Face's rotate_half, pair (i, i + d/2));
  llama.cpp's "llama" rotates adjacent pairs (2i, 2i + 1). So q and k rows are permuted per head
  (k with n_kv_heads heads): row 2i takes our row i, row 2i + 1 our row i + d/2. Attention scores
  are unchanged because q and k are permuted alike; v and the output projection are untouched.
- Tied head: only token_embd.weight is written; llama.cpp uses it as the output when
  output.weight is absent. An untied model also gets output.weight.
- Types: f32 writes everything as float32; f16, q8_0 and q4_0 apply to the 2-D matrices, norm gains
  stay float32 (as llama.cpp's own converter does). q8_0/q4_0 quantize each row in blocks of 32: a
  matrix whose row length is not a multiple of 32 is written f16 instead and listed in the summary.
- RoPE scalings: linear and yarn become llama.cpp's scaling keys; static NTK is just a larger
  rope.freq_base. dynamic-ntk and clex change frequencies with the length (clex's are learned);
  llama.cpp has no way to express that, so they are refused instead of silently dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from babyllama.config import ConfigError
from babyllama.export.hf import hf_state_dict
from babyllama.export.tokenizer import Vocabulary, chat_template_jinja

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
ARCH = "llama"

# our Hugging Face names (after "model.layers.N.") -> llama.cpp's (after "blk.N.")
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.weight
    return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from half-split to adjacent-pair RoPE order, head by head."""
    out, cols = w.shape
    half = out // n_heads // 2
    # (head, which half, i, cols) -> (head, i, which half, cols): row i and row i + d/2 become neighbours
    return w.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(out, cols)


def _add_rope(writer, cfg) -> None:
    import gguf
    from babyllama.model.rope import ntk_theta

    kind = cfg.rope_scaling
    if kind in ("dynamic-ntk", "clex"):
        why = "its frequencies are learned" if kind == "clex" else "its base grows with the sequence length"
        raise ConfigError(f"RoPE scaling {kind!r} cannot be written to GGUF: llama.cpp has no equivalent ({why}); "
                          f"export with none, linear, ntk or yarn scaling")
    writer.add_rope_freq_base(ntk_theta(cfg.rope_theta, cfg.head_dim, cfg.rope_factor) if kind == "ntk"
                              else cfg.rope_theta)
    if kind == "linear":  # llama.cpp divides positions by the factor (freq_scale = 1 / factor)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_factor)
    elif kind == "yarn":  # llama.cpp applies YaRN's attention factor 0.1 ln(factor) + 1 itself, as we do
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope_factor)
        writer.add_rope_scaling_orig_ctx_len(cfg.trained_len)
        writer.add_rope_scaling_yarn_beta_fast(cfg.rope_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(cfg.rope_beta_slow)


def _add_vocab(writer, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("llama")  # sentencepiece BPE driven by the scores, as ours
    writer.add_token_list(vocab.pieces)
    writer.add_token_scores([float(s) for s in vocab.scores])
    writer.add_token_types([int(t) for t in vocab.types])  # sentencepiece's numbers are GGUF's
    for add, token_id in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                          (writer.add_unk_token_id, vocab.unk_id), (writer.add_pad_token_id, vocab.pad_id),
                          (writer.add_eot_token_id, vocab.turn_end)):
        if token_id >= 0:  # sentencepiece says -1 for an id it lacks; GGUF stores unsigned ids
            add(token_id)
    # our templates and data carry their own markers: llama.cpp must add nothing around a text
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.dummy_prefix)
    writer.add_chat_template(chat_template_jinja(vocab))


def _encode(name: str, w: np.ndarray, out_type: str, fallback: list[str]):
    """(array, raw GGML type or None) for one tensor in the requested type."""
    import gguf

    if out_type == "f32" or w.ndim == 1:
        return w, None
    if out_type in ("q8_0", "q4_0"):
        qtype = gguf.GGMLQuantizationType[out_type.upper()]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if w.shape[-1] % block == 0:
            return gguf.quants.quantize(w, qtype), qtype
        fallback.append(name)  # rows are quantized in whole blocks: this one cannot be
    return w.astype(np.float16), None


def write_gguf(model, vocab: Vocabulary, path: Path, out_type: str = "f16", name: str = "babyllama") -> dict:
    """Write `model` (a float babyllama Llama) with `vocab` to `path` and an Ollama Modelfile
    beside it; returns a summary: path, type, bytes, tensors, fallback_f16, modelfile."""
    import gguf

    if out_type not in GGUF_TYPES:
        raise ConfigError(f"GGUF type {out_type!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg, path = model.config, Path(path)
    if len(vocab.pieces) != cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(vocab.pieces)} tokens but the model's vocab_size is {cfg.vocab_size}")
    tmp = path.with_suffix(".gguf.tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)  # writes general.architecture
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    _add_rope(writer, cfg)  # refuses what llama.cpp cannot compute, before anything is written
    _add_vocab(writer, vocab)

    fallback: list[str] = []
    tensors = hf_state_dict(model)
    for hf_name, t in tensors.items():
        t = t.detach().float().cpu()
        if hf_name.endswith("q_proj.weight"):
            t = interleave_rope_rows(t, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = interleave_rope_rows(t, cfg.n_kv_heads)
        target = gguf_name(hf_name)
        array, raw = _encode(target, t.numpy(), out_type, fallback)
        writer.add_tensor(target, array, raw_dtype=raw)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    modelfile = write_modelfile(vocab, path, cfg.max_seq_len)
    return {"path": str(path), "type": out_type, "bytes": path.stat().st_size, "tensors": len(tensors),
            "fallback_f16": fallback, "modelfile": str(modelfile)}


def modelfile_path(gguf_path: Path) -> Path:
    """FILE.Modelfile beside FILE.gguf: one per export, so several types can share a directory."""
    return Path(gguf_path).with_suffix(".Modelfile")


def write_modelfile(vocab: Vocabulary, gguf_path: Path, max_len: int) -> Path:
    """An Ollama Modelfile next to the GGUF file: our chat template in Go template syntax (the same
    text chat_template_jinja renders), the end marker as stop word, our sampling defaults."""
    gguf_path = Path(gguf_path)
    start, end = vocab.name(vocab.turn_start), vocab.name(vocab.turn_end)
    # where the tokenizer puts a "▁" before every text, the template writes that space itself
    content = "{{ if .Content }} {{ .Content }}{{ end }}" if vocab.dummy_prefix else "{{ .Content }}"
    template = (f"{{{{- range .Messages }}}}{start}{{{{ .Role }}}}\n{content}{end}\n{{{{ end }}}}"
                f"{start}assistant\n")
    text = (f"FROM ./{gguf_path.name}\n"
            f'TEMPLATE """{template}"""\n'
            f'PARAMETER stop "{end}"\n'
            "PARAMETER temperature 0.8\nPARAMETER top_k 50\nPARAMETER top_p 0.9\n"
            f"PARAMETER repeat_penalty 1.1\nPARAMETER num_ctx {max_len}\n")
    out = modelfile_path(gguf_path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
