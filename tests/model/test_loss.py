"""The fused LM head + cross-entropy against full logits and F.cross_entropy in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from babyllama.model.loss import IGNORE_INDEX, linear_cross_entropy

N, DIM, VOCAB = 37, 16, 300
# every 5th of the 37 rows is ignored by default; the 29 others, in chunks of 8, make three full
# chunks and a partial one of 5 rows
CHUNKS = 4
MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_}


class MatmulCounter(TorchDispatchMode):
    """Records the output shape of every matrix product that reaches ATen, forward and backward."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MATMULS:
            self.outputs.append(tuple(out.shape))
        return out


def inputs(seed=0, scale=1.0, ignored=slice(None, None, 5), h_grad=True, w_grad=True):
    torch.manual_seed(seed)
    h = (torch.randn(N, DIM) * scale).requires_grad_(h_grad)
    w = (torch.randn(VOCAB, DIM) * 0.5).requires_grad_(w_grad)
    t = torch.randint(0, VOCAB, (N,))
    t[ignored] = IGNORE_INDEX
    return h, w, t


def grad_output(reduction, seed=1):
    """Unequal weights per row (some negative) so a wrong row's gradient cannot hide in a sum."""
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(0.7) if reduction == "sum" else torch.randn(N, generator=g)


def reference(h, w, t, reduction, g):
    """Full logits in float64: the loss, and the gradients of (loss * g).sum() for inputs that want one."""
    h64 = h.detach().double().requires_grad_(h.requires_grad)
    w64 = w.detach().double().requires_grad_(w.requires_grad)
    loss = F.cross_entropy(F.linear(h64, w64), t, ignore_index=IGNORE_INDEX, reduction=reduction)
    if h.requires_grad or w.requires_grad:
        loss.backward(g.double())
    grads = [x.grad.float() if x.grad is not None else None for x in (h64, w64)]
    return loss.detach().float(), grads


def check(h, w, t, reduction, chunk_rows, rtol=1e-4, atol=1e-5):
    g = grad_output(reduction)
    ours = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows, reduction=reduction)
    assert ours.dtype == torch.float32 and ours.shape == (() if reduction == "sum" else (N,))
    ours.backward(g)
    ref, (rh, rw) = reference(h, w, t, reduction, g)
    torch.testing.assert_close(ours.detach(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(h.grad, rh, rtol=rtol, atol=atol)
    torch.testing.assert_close(w.grad, rw, rtol=rtol, atol=atol)
    return ours.detach()


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("chunk_rows", [8, None])  # several chunks (the last partial), one chunk
def test_values_and_gradients_match_full_logits(reduction, chunk_rows):
    h, w, t = inputs()
    ours = check(h, w, t, reduction, chunk_rows)
    if reduction == "none":
        ignored = t == IGNORE_INDEX
        assert ignored.sum() == 8 and (ours[ignored] == 0.0).all() and (ours[~ignored] > 0).all()
        assert (h.grad[ignored] == 0).all()  # no gradient reaches ignored positions


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_large_logits_stay_finite(reduction):
    """Logits in the hundreds overflow a naive exp."""
    h, w, t = inputs(seed=3, scale=40.0)
    ours = check(h, w, t, reduction, chunk_rows=8, atol=1e-4)
    assert torch.isfinite(ours).all() and ours.sum() > 1000


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_all_rows_ignored(reduction):
    h, w, t = inputs(ignored=slice(None))
    ours = check(h, w, t, reduction, chunk_rows=8)
    assert (ours == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bf16_autocast_is_close_to_float64(reduction):
    h, w, t = inputs(seed=4)
    g = grad_output(reduction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, chunk_rows=8, reduction=reduction)
    ours.backward(g)  # outside the autocast region: backward must still compute in bfloat16's way
    ref, (rh, rw) = reference(h, w, t, reduction, g)
    assert ours.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(ours.detach(), ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(h.grad, rh, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(w.grad, rw, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_grad_computes_only_the_logits(reduction):
    h, w, t = inputs()
    with torch.no_grad(), MatmulCounter() as rec:
        ours = linear_cross_entropy(h, w, t, chunk_rows=8, reduction=reduction)
    assert not ours.requires_grad
    assert len(rec.outputs) == CHUNKS  # one logits product per chunk, no gradient products
    ref, _ = reference(h, w, t, reduction, grad_output(reduction))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def count_matmuls(h, w, t, reduction):
    with MatmulCounter() as rec:
        linear_cross_entropy(h, w, t, chunk_rows=8, reduction=reduction).backward(grad_output(reduction))
    return rec.outputs


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_frozen_weight_skips_the_weight_gradient(reduction):
    """LoRA: the LM head is frozen, so its (vocab, dim) gradient product must not run at all."""
    both = count_matmuls(*inputs(), reduction)
    h, w, t = inputs(w_grad=False)
    frozen = count_matmuls(h, w, t, reduction)
    assert len(frozen) < len(both)
    assert (VOCAB, DIM) in both and (VOCAB, DIM) not in frozen
    assert len(frozen) == len(both) - CHUNKS  # one product less in each chunk
    h.grad = None
    check(h, w, t, reduction, chunk_rows=8)  # loss and grad of hidden still right
    assert w.grad is None


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_frozen_hidden_skips_the_hidden_gradient(reduction):
    both = count_matmuls(*inputs(), reduction)
    h, w, t = inputs(h_grad=False)
    frozen = count_matmuls(h, w, t, reduction)
    assert len(frozen) < len(both)
    assert len(frozen) == len(both) - CHUNKS
    # the hidden-state gradient comes in (rows, dim) pieces, a chunk of rows at a time
    assert any(s[1] == DIM and s[0] <= 8 for s in both) and not any(s[1] == DIM and s[0] <= 8 for s in frozen)
    w.grad = None
    check(h, w, t, reduction, chunk_rows=8)  # loss and grad of weight still right
    assert h.grad is None


def test_per_row_losses_never_hold_more_than_a_chunk_of_logits():
    """Every product touching the vocabulary, in forward and in backward, covers at most 8 rows."""
    h, w, t = inputs()
    shapes = count_matmuls(h, w, t, "none")
    vocab_sized = [s for s in shapes if VOCAB in s and s != (VOCAB, DIM)]  # (VOCAB, DIM) is grad_w
    assert len(vocab_sized) == 2 * CHUNKS  # the logits in forward, and again in backward
    assert all(s[0] * s[1] <= VOCAB * 8 for s in vocab_sized)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ignored_rows_inside_the_chunks(reduction, monkeypatch):
    """Under torch.compile the ignored rows are not selected away but masked in each chunk: they
    must still lose nothing and get no gradient, whatever grad_output holds for them."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    h, w, t = inputs()
    with MatmulCounter() as rec:
        linear_cross_entropy(h, w, t, chunk_rows=8, reduction=reduction)
    assert len(rec.outputs) == 5 * (3 if reduction == "sum" else 1)  # all 37 rows: 5 chunks
    ours = check(h, w, t, reduction, chunk_rows=8)
    assert (h.grad[t == IGNORE_INDEX] == 0).all()
    if reduction == "none":
        assert (ours[t == IGNORE_INDEX] == 0.0).all()


def test_per_row_losses_sum_to_the_summed_loss():
    h, w, t = inputs()
    with torch.no_grad():
        rows = linear_cross_entropy(h, w, t, chunk_rows=8, reduction="none")
        total = linear_cross_entropy(h, w, t, chunk_rows=8)
    torch.testing.assert_close(rows.sum(), total)


def test_unknown_reduction_is_refused():
    h, w, t = inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="mean")
