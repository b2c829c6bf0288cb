"""S2-Attn (LongLoRA's shifted sparse attention): equal to a naive per-token reference, never sees
the future (the wrapped-around group is split), full attention at inference, and a whole model trains."""

import copy
import math

import pytest
import torch

from babyllama.model import Llama
from babyllama.model.llama import DotProductAttention
from babyllama.train.s2attn import ShiftedSparseAttention, apply_s2_attn, shifted_sparse_attention
from tests.conftest import tiny_model_config


def reference(q, k, v, G):
    """Written out token by token: key j is allowed for query i when j <= i and both are in the same
    group; unshifted heads group by j // G, the last H//2 (shifted) heads by (j + G/2) // G, which
    makes [0, G/2) group 0, [G/2, 3G/2) group 1, ..., [T-G/2, T) group T/G."""
    B, H, T, D = q.shape
    n_plain = H - H // 2
    out = torch.zeros_like(q)
    for h in range(H):
        group = (lambda j: j // G) if h < n_plain else (lambda j: (j + G // 2) // G)
        for i in range(T):
            keys = [j for j in range(i + 1) if group(j) == group(i)]
            scores = torch.einsum("bd,bjd->bj", q[:, h, i], k[:, h, keys]) / math.sqrt(D)
            out[:, h, i] = torch.einsum("bj,bjd->bd", scores.softmax(dim=-1), v[:, h, keys])
    return out


def qkv(B=2, H=4, T=32, D=16):
    return (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))


def s2(G):
    return ShiftedSparseAttention(DotProductAttention(), G).train()


def test_group_definition_of_the_shifted_heads():
    G, T = 8, 32
    groups = [(j + G // 2) // G for j in range(T)]
    assert groups[:4] == [0] * 4 and groups[4:12] == [1] * 8 and groups[-4:] == [T // G] * 4


@pytest.mark.parametrize("H", [4, 3])
def test_matches_naive_reference(H):
    q, k, v = qkv(H=H)
    out = s2(8)(q, k, v, None, True)
    assert out.shape == q.shape
    torch.testing.assert_close(out, reference(q, k, v, 8), atol=1e-5, rtol=1e-5)


def test_one_group_unshifted_heads_are_full_causal_attention():
    q, k, v = qkv(T=16)
    full = DotProductAttention()(q, k, v, None, True)
    out = shifted_sparse_attention(q, k, v, group_size=16)
    torch.testing.assert_close(out[:, :2], full[:, :2], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(out[:, 2:], full[:, 2:])  # the shifted heads are split in two halves


def test_full_attention_when_not_training_or_short_or_masked():
    q, k, v = qkv()
    inner = DotProductAttention()
    wrapped = ShiftedSparseAttention(inner, 8)
    full = inner(q, k, v, None, True)
    assert torch.equal(wrapped.eval()(q, k, v, None, True), full)
    wrapped.train()
    assert not torch.allclose(wrapped(q, k, v, None, True), full)
    assert torch.equal(ShiftedSparseAttention(inner, 32).train()(q, k, v, None, True), full)  # one group
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    assert torch.equal(wrapped(q, k, v, mask, False), inner(q, k, v, mask, False))


def test_no_future_leak():
    q, k, v = qkv()
    attn = s2(8)
    out = attn(q, k, v, None, True)
    for i in range(31):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, i + 1:] = torch.randn_like(x[:, :, i + 1:])
        out2 = attn(q2, k2, v2, None, True)
        # all heads, including the shifted heads' first G/2 positions (the wrapped-around group)
        assert torch.equal(out2[:, :, :i + 1], out[:, :, :i + 1]), i
        assert not torch.allclose(out2[:, :, i + 1:], out[:, :, i + 1:])


def test_model_trains_and_infers_as_before():
    cfg = tiny_model_config(max_seq_len=32, n_heads=4, n_kv_heads=2, dim=64)
    base = Llama(cfg)
    model = copy.deepcopy(base)
    assert apply_s2_attn(model, 8) == cfg.n_layers
    assert sum(isinstance(m, ShiftedSparseAttention) for m in model.modules()) == cfg.n_layers

    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    model.train()
    loss = model(tokens, targets=tokens.roll(-1, dims=1))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    base.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))
        base.train(), model.train()
        assert not torch.allclose(model(tokens), base(tokens))  # sparse while training


def test_bad_lengths_and_group_sizes():
    q, k, v = qkv(T=20)
    with pytest.raises(ValueError, match="s2_group_size"):
        s2(8)(q, k, v, None, True)
    model = Llama(tiny_model_config(max_seq_len=32))
    for bad in (0, 1, 7, -2):
        with pytest.raises(ValueError, match="s2_group_size"):
            apply_s2_attn(model, bad)
    with pytest.raises(ValueError, match="s2_group_size"):
        ShiftedSparseAttention(DotProductAttention(), 3)
    apply_s2_attn(model, 8)
    with pytest.raises(ValueError, match="already applied"):
        apply_s2_attn(model, 8)
