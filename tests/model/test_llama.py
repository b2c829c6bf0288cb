import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from babyllama.model import Llama
from babyllama.model.loss import IGNORE_INDEX, linear_cross_entropy
from babyllama.model.rope import apply_rope, rope_cos_sin
from tests.conftest import tiny_model_config


class MatmulRecorder(TorchDispatchMode):
    """Records the operand shapes of every matrix product that reaches ATen."""

    OPS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2),
           torch.ops.aten.addmm_.default: (1, 2), torch.ops.aten.mm.out: (0, 1)}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            i, j = self.OPS[func]
            self.shapes.append((tuple(args[i].shape), tuple(args[j].shape)))
        return func(*args, **(kwargs or {}))


def naive_attention(q, k, v):
    """Softmax(QK^T / sqrt(d) + causal mask) V, written out."""
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def naive_forward(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """The same network written step by step, with repeat of kv heads and naive attention."""
    cfg = model.config
    x = model.tok_embeddings(tokens)
    B, T, _ = x.shape
    cos, sin = model.rope.cos[:T], model.rope.sin[:T]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    for layer in model.layers:
        h = rms(x, layer.attention_norm.weight)
        qkv = h @ layer.attention.wqkv.weight.t()
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        q = qkv[..., :q_dim].reshape(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = qkv[..., q_dim:q_dim + kv_dim].reshape(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = qkv[..., q_dim + kv_dim:].reshape(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = cfg.n_heads // cfg.n_kv_heads
        k = torch.cat([k[:, i // rep:i // rep + 1] for i in range(cfg.n_heads)], dim=1)
        v = torch.cat([v[:, i // rep:i // rep + 1] for i in range(cfg.n_heads)], dim=1)
        a = naive_attention(q, k, v).transpose(1, 2).reshape(B, T, -1)
        x = x + a @ layer.attention.wo.weight.t()
        h = rms(x, layer.ffn_norm.weight)
        gate, up = (h @ layer.feed_forward.w13.weight.t()).split(cfg.hidden_dim, dim=-1)
        x = x + (F.silu(gate) * up) @ layer.feed_forward.w2.weight.t()
    return rms(x, model.norm.weight) @ model.output.weight.t()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_forward_matches_naive_reference(n_kv_heads):
    model = Llama(tiny_model_config(n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, 1024, (2, 33))
    torch.testing.assert_close(model(tokens), naive_forward(model, tokens), rtol=1e-4, atol=1e-4)


def test_model_is_causal():
    model = Llama(tiny_model_config()).eval()
    a = torch.randint(0, 1024, (1, 20))
    b = a.clone()
    b[0, 12:] = torch.randint(0, 1024, (8,))
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_rope_rotation_is_relative():
    """Scores of rotated q, k depend only on the distance between positions."""
    cos, sin = rope_cos_sin(16, 64)
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, 16), cos[i:i + 1], sin[i:i + 1])
        kj = apply_rope(k.view(1, 1, 1, 16), cos[j:j + 1], sin[j:j + 1])
        return float((qi * kj).sum())

    assert score(5, 2) == pytest.approx(score(40, 37), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def plain_loss_and_grads(h, w, t, scale=1.0):
    """The reference: full logits and F.cross_entropy. Takes (and clears) the grads already on h, w
    and returns (ours_grads, (ref_loss, ref_grads))."""
    ours = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    (ref * scale).backward()
    return ours, (ref, (h.grad, w.grad))


def test_fused_loss_and_gradients_match_plain_cross_entropy():
    torch.manual_seed(1)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    t[::7] = IGNORE_INDEX
    ours = linear_cross_entropy(h, w, t, chunk_rows=8)
    ours.backward(torch.tensor(0.5))
    (gh, gw), (ref, (rh, rw)) = plain_loss_and_grads(h, w, t, scale=0.5)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


def test_fused_loss_is_stable_for_large_logits_and_uneven_chunks():
    """Logits in the hundreds overflow a naive exp; the last chunk here is shorter than the rest."""
    torch.manual_seed(3)
    h = (torch.randn(37, 16) * 40).requires_grad_()
    w = torch.randn(200, 16, requires_grad=True)
    t = torch.randint(0, 200, (37,))
    ours = linear_cross_entropy(h, w, t, chunk_rows=16)
    ours.backward()
    (gh, gw), (ref, (rh, rw)) = plain_loss_and_grads(h, w, t)
    assert torch.isfinite(ours) and ours > 1000
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


def test_fused_loss_under_bf16_autocast_is_close_to_float32():
    torch.manual_seed(4)
    h = torch.randn(24, 32, requires_grad=True)
    w = (torch.randn(64, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 64, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(h, w, t, chunk_rows=8)
    low.backward()
    (gh, gw), (ref, (rh, rw)) = plain_loss_and_grads(h, w, t)
    assert low.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0.0)
    torch.testing.assert_close(gh, rh, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gw, rw, rtol=5e-2, atol=5e-2)


def test_model_loss_equals_cross_entropy_of_logits():
    model = Llama(tiny_model_config(tie_embeddings=False))
    x, y = torch.randint(0, 1024, (2, 16)), torch.randint(0, 1024, (2, 16))
    loss = model(x, y)
    ref = F.cross_entropy(model(x).reshape(-1, 1024), y.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-3)


def test_parameter_count_formula_matches_model():
    for tie in (True, False):
        cfg = tiny_model_config(tie_embeddings=tie)
        assert Llama(cfg).num_params() == cfg.num_params()


def test_sequence_longer_than_context_is_refused():
    model = Llama(tiny_model_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_fused_loss_skips_gradient_work_without_grad():
    """Evaluation under no_grad must not compute the gradient matmuls."""
    h, w = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    with torch.no_grad(), MatmulRecorder() as rec:
        linear_cross_entropy(h, w, t, chunk_rows=8)
    assert len(rec.shapes) == 1  # logits only
    with MatmulRecorder() as rec:
        linear_cross_entropy(h, w, t, chunk_rows=8)
    assert len(rec.shapes) == 3  # logits, then the hidden-state and the weight gradients


def test_fused_loss_only_multiplies_rows_that_count():
    """SFT: with loss on 3 of 40 positions the LM head sees 3 rows, and the gradients still match."""
    torch.manual_seed(2)
    h = torch.randn(40, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.full((40,), IGNORE_INDEX)
    t[[5, 17, 39]] = torch.tensor([1, 2, 3])
    with MatmulRecorder() as rec:
        linear_cross_entropy(h, w, t).backward()
    assert len(rec.shapes) == 3  # logits and both gradients, each over the 3 rows that count
    assert all(3 in a + b and 40 not in a + b for a, b in rec.shapes)
    (gh, gw), (_, (rh, rw)) = plain_loss_and_grads(h, w, t)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
    assert gh[[0, 6, 38]].abs().sum() == 0  # no gradient reaches ignored positions


def test_fused_loss_with_nothing_to_count_is_zero():
    h = torch.randn(6, 4, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(10, 4), torch.full((6,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0


def test_packed_segments_compute_each_document_as_if_alone():
    """Two documents packed in one row (and a padded tail) give the same logits and loss as each
    document on its own: no attention across the boundary, positions restarting at 0."""
    torch.manual_seed(3)
    model = Llama(tiny_model_config())
    a, b = torch.randint(0, 1024, (1, 7)), torch.randint(0, 1024, (1, 5))
    row = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 5 + [-1] * 4])
    packed = model(row, segments=segments)
    torch.testing.assert_close(packed[:, :7], model(a), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[:, 7:12], model(b), rtol=1e-4, atol=1e-5)
    ya, yb = torch.randint(0, 1024, (1, 7)), torch.randint(0, 1024, (1, 5))
    targets = torch.cat([ya, yb, torch.full((1, 4), IGNORE_INDEX)], dim=1)
    torch.testing.assert_close(model(row, targets, segments=segments), model(a, ya) + model(b, yb),
                               rtol=1e-4, atol=1e-4)
    # without segments the second document would see the first: the logits differ
    assert not torch.allclose(model(row)[:, 7:12], model(b), atol=1e-3)
