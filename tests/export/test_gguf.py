"""GGUF export: read back with gguf's own reader, and run by an independent llama.cpp-style forward
pass that sees nothing but the file (adjacent-pair RoPE, so it checks the q/k permutation)."""

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from babyllama.config import ConfigError  # noqa: E402
from babyllama.export import gguf as export  # noqa: E402
from babyllama.export.tokenizer import CONTROL, chat_template_jinja, vocabulary  # noqa: E402
from babyllama.model import Llama  # noqa: E402
from babyllama.model.rope import ntk_theta  # noqa: E402
from tests.conftest import needs_shared, tiny_model_config  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return vocabulary(tokenizer)


def random_model(vocab_size: int, **kw) -> Llama:
    """Weights large enough that attention is far from uniform (a wrong RoPE layout shows), and
    norm gains that are not all ones (so the norms are really compared)."""
    model = Llama(tiny_model_config(vocab_size=vocab_size, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[1]))
    return model


def meta(reader, key, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def tensors(reader) -> dict:
    """name -> (GGML type, float32 array in PyTorch's (rows, cols) order)."""
    out = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))  # GGUF lists dimensions innermost first
        out[t.name] = (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))
    return out


def expected_tensors(model) -> dict:
    """Our weights under llama.cpp's names, q/k rows in adjacent-pair order, built row by row here
    (not with the exporter's reshape): GGUF row h*d + 2i + a is our row h*d + a*d/2 + i."""
    cfg = model.config
    d, half = cfg.head_dim, cfg.head_dim // 2

    def pairs(w, heads):
        order = [h * d + a * half + i for h in range(heads) for i in range(half) for a in (0, 1)]
        return w[order]

    q, kv = cfg.n_heads * d, cfg.n_kv_heads * d
    out = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.output.weight
    for n, layer in enumerate(model.layers):
        wqkv = layer.attention.wqkv.weight
        gate, up = layer.feed_forward.w13.weight.split(cfg.hidden_dim)
        out |= {f"blk.{n}.attn_q.weight": pairs(wqkv[:q], cfg.n_heads),
                f"blk.{n}.attn_k.weight": pairs(wqkv[q:q + kv], cfg.n_kv_heads),
                f"blk.{n}.attn_v.weight": wqkv[q + kv:], f"blk.{n}.attn_output.weight": layer.attention.wo.weight,
                f"blk.{n}.ffn_gate.weight": gate, f"blk.{n}.ffn_up.weight": up,
                f"blk.{n}.ffn_down.weight": layer.feed_forward.w2.weight,
                f"blk.{n}.attn_norm.weight": layer.attention_norm.weight,
                f"blk.{n}.ffn_norm.weight": layer.ffn_norm.weight}
    return {k: v.detach().float().numpy() for k, v in out.items()}


def rope_angles(reader, T: int, n_rot: int):
    """cos, sin (T, n_rot/2) and the magnitude factor as ggml computes them (ggml_rope_ext / rope_yarn)."""
    base = meta(reader, "llama.rope.freq_base")
    kind = meta(reader, "llama.rope.scaling.type", "none")
    freq_scale = 1.0 / meta(reader, "llama.rope.scaling.factor", 1.0) if kind != "none" else 1.0
    i = np.arange(n_rot // 2)
    extrap = np.arange(T)[:, None] * base ** (-2.0 * i / n_rot)[None, :]
    theta, mscale = freq_scale * extrap, 1.0
    if kind == "yarn":  # llama.cpp sets ext_factor = 1 for YaRN
        orig = meta(reader, "llama.rope.scaling.original_context_length")

        def corr_dim(turns):
            return n_rot * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))

        low = max(0, math.floor(corr_dim(meta(reader, "llama.rope.scaling.yarn_beta_fast", 32.0))))
        high = min(n_rot - 1, math.ceil(corr_dim(meta(reader, "llama.rope.scaling.yarn_beta_slow", 1.0))))
        mix = 1 - np.clip((i - low) / max(0.001, high - low), 0, 1)
        theta = theta * (1 - mix) + extrap * mix
        mscale = 1 + 0.1 * math.log(1 / freq_scale)
    return np.cos(theta), np.sin(theta), mscale


def reference_logits(path, tokens: list[int]) -> np.ndarray:
    """A llama.cpp-style Llama in float64 numpy, from the GGUF file's tensors and metadata only."""
    r = gguf.GGUFReader(path)
    w = {k: v.astype(np.float64) for k, (_, v) in tensors(r).items()}
    H, Hkv = meta(r, "llama.attention.head_count"), meta(r, "llama.attention.head_count_kv")
    eps, n_rot = meta(r, "llama.attention.layer_norm_rms_epsilon"), meta(r, "llama.rope.dimension_count")
    d = meta(r, "llama.embedding_length") // H
    T = len(tokens)
    cos, sin, mscale = rope_angles(r, T, n_rot)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):  # (T, heads, d): adjacent pairs (2i, 2i+1) turn by angle i
        even, odd = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :] * mscale, sin[:, None, :] * mscale
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
        return out

    x = w["token_embd.weight"][tokens]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for n in range(meta(r, "llama.block_count")):
        b = lambda name: w[f"blk.{n}.{name}.weight"]  # noqa: E731
        h = norm(x, b("attn_norm"))
        q = rope((h @ b("attn_q").T).reshape(T, H, d))
        k = rope((h @ b("attn_k").T).reshape(T, Hkv, d))
        v = (h @ b("attn_v").T).reshape(T, Hkv, d)
        heads = []
        for j in range(H):
            kv = j // (H // Hkv)  # ggml broadcasts each kv head over consecutive query heads
            scores = np.where(causal, q[:, j] @ k[:, kv].T / math.sqrt(d), -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, -1) @ b("attn_output").T
        h = norm(x, b("ffn_norm"))
        gate = h @ b("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    head = w.get("output.weight", w["token_embd.weight"])  # llama.cpp's fallback for a tied head
    return norm(x, w["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("tie,scaling", [(True, "none"), (False, "none"), (True, "linear"), (True, "ntk"),
                                         (False, "yarn")])
def test_independent_forward_matches_our_logits(vocab, tmp_path, tie, scaling):
    kw = {} if scaling == "none" else dict(rope_scaling=scaling, rope_factor=2.0, max_seq_len=128,
                                             rope_original_len=64)
    if scaling == "yarn":
        kw |= dict(rope_beta_fast=16.0, rope_beta_slow=2.0)  # not llama.cpp's defaults: the keys must be read
    model = random_model(len(vocab.pieces), tie_embeddings=tie, **kw)
    path = tmp_path / "m.gguf"
    export.write_gguf(model, vocab, path, "f32")
    tokens = torch.randint(0, len(vocab.pieces), (20,)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double().numpy()
    np.testing.assert_allclose(reference_logits(path, tokens), ours, rtol=0, atol=1e-4)


def test_reference_sees_a_wrong_rope_layout(vocab, tmp_path, monkeypatch):
    """The forward check above is sharp enough: without the permutation the logits are far off."""
    model = random_model(len(vocab.pieces))
    monkeypatch.setattr(export, "interleave_rope_rows", lambda w, heads: w)
    export.write_gguf(model, vocab, tmp_path / "m.gguf", "f32")
    tokens = torch.randint(0, len(vocab.pieces), (20,)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double().numpy()
    assert np.abs(reference_logits(tmp_path / "m.gguf", tokens) - ours).max() > 1e-2


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("tie", [True, False])
def test_tensors_metadata_and_vocabulary_read_back(vocab, tmp_path, out_type, tie):
    model = random_model(len(vocab.pieces), tie_embeddings=tie)
    cfg, path = model.config, tmp_path / "m.gguf"
    summary = export.write_gguf(model, vocab, path, out_type, name="tiny")
    assert not path.with_suffix(".gguf.tmp").exists()
    r = gguf.GGUFReader(path)
    got, want = tensors(r), expected_tensors(model)
    assert sorted(got) == sorted(want) and ("output.weight" in got) == (not tie)
    assert summary | {"modelfile": None} == {"path": str(path), "type": out_type, "bytes": path.stat().st_size,
                                             "tensors": len(want), "fallback_f16": [], "modelfile": None}
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[out_type]
    for name, (kind, array) in got.items():
        source = want[name]
        assert array.shape == source.shape, name
        if source.ndim == 1 or out_type == "f32":  # norm gains are always float32, and exact
            assert kind == Q.F32 and np.array_equal(array, source), name
        elif out_type == "f16":
            assert kind == Q.F16 and np.array_equal(array, source.astype(np.float16).astype(np.float32)), name
        else:  # q8_0: within one quantization step of its block of 32 (step = block's max |x| / 127)
            step = np.abs(source.reshape(-1, 32)).max(-1, keepdims=True) / 127
            assert kind == matrix_type and (np.abs(array - source).reshape(-1, 32) <= step).all(), name

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    assert meta(r, "general.architecture") == "llama" and meta(r, "general.name") == "tiny"
    assert meta(r, "general.file_type") == file_type
    expected = {"context_length": cfg.max_seq_len, "embedding_length": cfg.dim, "block_count": cfg.n_layers,
                "feed_forward_length": cfg.hidden_dim, "attention.head_count": cfg.n_heads,
                "attention.head_count_kv": cfg.n_kv_heads, "rope.dimension_count": cfg.head_dim,
                "vocab_size": cfg.vocab_size, "rope.freq_base": cfg.rope_theta}
    assert {k: meta(r, "llama." + k) for k in expected} == expected
    assert meta(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert meta(r, "llama.rope.scaling.type") is None

    assert meta(r, "tokenizer.ggml.model") == "llama"
    assert meta(r, "tokenizer.ggml.tokens") == vocab.pieces
    assert meta(r, "tokenizer.ggml.scores") == np.float32(vocab.scores).tolist()
    assert meta(r, "tokenizer.ggml.token_type") == vocab.types
    ids = {"bos": vocab.bos_id, "eos": vocab.eos_id, "unknown": vocab.unk_id, "padding": vocab.pad_id,
           "eot": vocab.turn_end}
    assert {k: meta(r, f"tokenizer.ggml.{k}_token_id") for k in ids} == ids
    assert vocab.types[vocab.turn_start] == vocab.types[vocab.turn_end] == CONTROL
    assert meta(r, "tokenizer.ggml.add_bos_token") is False and meta(r, "tokenizer.ggml.add_eos_token") is False
    assert meta(r, "tokenizer.ggml.add_space_prefix") is vocab.dummy_prefix
    assert meta(r, "tokenizer.chat_template") == chat_template_jinja(vocab)


def test_scaling_keys(vocab, tmp_path):
    def written(**kw):
        model = random_model(len(vocab.pieces), rope_factor=4.0, max_seq_len=256, rope_original_len=64, **kw)
        export.write_gguf(model, vocab, tmp_path / "m.gguf", "f16")
        r = gguf.GGUFReader(tmp_path / "m.gguf")
        keys = ("freq_base", "scaling.type", "scaling.factor", "scaling.original_context_length",
                "scaling.yarn_beta_fast", "scaling.yarn_beta_slow")
        return {k: meta(r, "llama.rope." + k) for k in keys if meta(r, "llama.rope." + k) is not None}

    assert written(rope_scaling="linear") == {"freq_base": 10000.0, "scaling.type": "linear", "scaling.factor": 4.0}
    assert written(rope_scaling="ntk") == {"freq_base": pytest.approx(ntk_theta(10000.0, 16, 4.0), rel=1e-6)}
    assert written(rope_scaling="yarn", rope_beta_fast=24.0, rope_beta_slow=2.0) == {
        "freq_base": 10000.0, "scaling.type": "yarn", "scaling.factor": 4.0, "scaling.original_context_length": 64,
        "scaling.yarn_beta_fast": 24.0, "scaling.yarn_beta_slow": 2.0}


@pytest.mark.parametrize("scaling", ["dynamic-ntk", "clex"])
def test_length_dependent_scalings_are_refused(vocab, tmp_path, scaling):
    model = random_model(len(vocab.pieces), rope_scaling=scaling, rope_factor=2.0, max_seq_len=128)
    with pytest.raises(ConfigError, match=f"'{scaling}'.*llama.cpp"):
        export.write_gguf(model, vocab, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_q4_0_falls_back_to_f16_for_rows_not_in_blocks_of_32(vocab, tmp_path):
    model = random_model(len(vocab.pieces), dim=48, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    assert model.config.hidden_dim == 128  # ffn_down's rows (hidden_dim long) quantize, the 48-long ones cannot
    summary = export.write_gguf(model, vocab, tmp_path / "m.gguf", "q4_0")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    got, want = tensors(r), expected_tensors(model)
    matrices = {name for name, w in want.items() if w.ndim == 2}
    assert set(summary["fallback_f16"]) == {n for n in matrices if "ffn_down" not in n}
    for name in matrices:
        kind, array = got[name]
        if name in summary["fallback_f16"]:
            assert kind == Q.F16 and np.array_equal(array, want[name].astype(np.float16).astype(np.float32))
        else:  # q4_0: 16 levels, step = block's max |x| / 8
            step = np.abs(want[name].reshape(-1, 32)).max(-1, keepdims=True) / 8
            assert kind == Q.Q4_0 and (np.abs(array - want[name]).reshape(-1, 32) <= step).all()
    assert meta(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0


def test_modelfile_beside_the_file(vocab, tmp_path):
    import jinja2

    model = random_model(len(vocab.pieces))
    path = tmp_path / "tiny.gguf"
    summary = export.write_gguf(model, vocab, path, "f16")
    text = export.modelfile_path(path).read_text(encoding="utf-8")
    assert summary["modelfile"] == str(export.modelfile_path(path))
    start, end = vocab.name(vocab.turn_start), vocab.name(vocab.turn_end)
    assert text.startswith("FROM ./tiny.gguf\n")
    assert f'PARAMETER stop "{end}"' in text and f"PARAMETER num_ctx {model.config.max_seq_len}" in text
    for line in ("temperature 0.8", "top_k 50", "top_p 0.9", "repeat_penalty 1.1"):
        assert f"PARAMETER {line}\n" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == (f"{{{{- range .Messages }}}}{start}{{{{ .Role }}}}\n{{{{ .Content }}}}{end}\n{{{{ end }}}}"
                        f"{start}assistant\n")
    # rendered by hand (our tokenizer has no dummy prefix), it is the Jinja template's text
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]
    body = template.removeprefix("{{- range .Messages }}").split("{{ end }}")[0]
    by_hand = "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                      for m in messages) + template.split("{{ end }}")[1]
    jinja = jinja2.Template(chat_template_jinja(vocab)).render(messages=messages, add_generation_prompt=True)
    assert by_hand == jinja


def test_chatglm2_tokenizer_written_whole(tmp_path):
    from babyllama.tokenizer import load_tokenizer

    vocab = vocabulary(load_tokenizer(needs_shared("tokenizers/chatglm2")))
    model = random_model(len(vocab.pieces), dim=32, n_heads=2, n_kv_heads=1, n_layers=1)
    path = tmp_path / "glm.gguf"
    export.write_gguf(model, vocab, path, "f16")
    r = gguf.GGUFReader(path)
    tokens, types = meta(r, "tokenizer.ggml.tokens"), meta(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 64794 and tokens == vocab.pieces
    assert tokens[64789:] == ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]
    assert types[64789:] == [gguf.TokenType.CONTROL] * 5
    assert meta(r, "tokenizer.ggml.add_space_prefix") is True
    assert meta(r, "tokenizer.ggml.padding_token_id") not in range(64789, 64794)
    assert meta(r, "tokenizer.ggml.eot_token_id") == 64793
    text = export.modelfile_path(path).read_text(encoding="utf-8")
    assert "<sop>{{ .Role }}\n{{ if .Content }} {{ .Content }}{{ end }}<eop>\n" in text
    assert 'PARAMETER stop "<eop>"' in text
