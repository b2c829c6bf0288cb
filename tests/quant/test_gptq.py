"""GPTQ against a plain reference implementation of the paper's algorithm, written here: one column
at a time, the inverse Hessian updated by Gaussian elimination (the paper's Eq. 3) in float64,
with none of the implementation's tricks (Cholesky form, blocks, lazy batched updates)."""

import pytest
import torch

from babyllama.quant.gptq import Hessian, gptq
from babyllama.quant.pack import dequantize_codes, grid, quantize_codes, rtn


def reference_gptq(W, H, bits, group, sym, act_order, damp=0.01):
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scales, zeros = torch.zeros(rows, cols // group, dtype=torch.float64), torch.zeros(rows, cols // group, dtype=torch.float64)
    if act_order:
        for g in range(cols // group):
            s, z = grid(W[:, g * group:(g + 1) * group], bits, sym)
            scales[:, g], zeros[:, g] = s, z
        order = torch.argsort(torch.diag(H), descending=True)
    else:
        order = torch.arange(cols)
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(rows, cols)
    remaining = list(order.tolist())
    for c in order.tolist():
        g = c // group
        if not act_order and c % group == 0:
            s, z = grid(W[:, c:c + group], bits, sym)
            scales[:, g], zeros[:, g] = s, z
        q = quantize_codes(W[:, c:c + 1], scales[:, g], zeros[:, g], bits)[:, 0]
        codes[:, c] = q
        err = (W[:, c] - scales[:, g] * (q - zeros[:, g])) / Hinv[c, c]
        remaining.remove(c)
        W[:, remaining] -= err[:, None] * Hinv[c, remaining][None, :]
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return codes.to(torch.uint8), scales.float(), zeros.float()


def _layer(rows=24, cols=128, tokens=512):
    torch.manual_seed(0)
    mix = torch.randn(cols, cols) / cols ** 0.5 + torch.eye(cols)  # correlated inputs, unequal energies
    x = (torch.randn(tokens, cols) * torch.logspace(-1, 0.5, cols)) @ mix
    x[:, 5] = 0  # an input that is never active
    h = Hessian(cols)
    for chunk in x.split(100):
        h.add(chunk)
    return torch.randn(rows, cols) * 0.05, h.matrix, x


def _output_error(x, w, codes, scales, zeros, group):
    approx = dequantize_codes(codes.view(-1, group), scales.reshape(-1), zeros.reshape(-1)).view_as(w)
    return float((x @ approx.t() - x @ w.t()).pow(2).sum() / (x @ w.t()).pow(2).sum())


def test_the_hessian_is_the_mean_of_x_transposed_x():
    _, h, x = _layer()
    torch.testing.assert_close(h, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, False, False), (3, 64, True, False),
                                                        (4, 32, False, True), (2, 128, False, False)])
def test_gptq_equals_the_reference_algorithm(bits, group, sym, act_order):
    w, h, x = _layer()
    codes, scales, zeros = gptq(w, h, bits, group, sym, act_order, block=48)  # blocks that cut groups in two
    ref_codes, ref_scales, ref_zeros = reference_gptq(w, h, bits, group, sym, act_order)
    # float32 against float64: a code may differ where a value sits on a rounding boundary
    assert (codes == ref_codes).float().mean() > 0.995
    torch.testing.assert_close(scales, ref_scales, rtol=1e-3, atol=1e-6)
    ours, theirs = (_output_error(x, w, c, s, z, group) for c, s, z in
                    ((codes, scales, zeros), (ref_codes, ref_scales, ref_zeros)))
    assert ours == pytest.approx(theirs, rel=0.02)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits):
    w, h, x = _layer()
    g = gptq(w, h, bits, 32, False)
    r = rtn(w, bits, 32, False)
    assert _output_error(x, w, *g, 32) < 0.8 * _output_error(x, w, *r, 32)
    codes, scales, zeros = g
    assert (codes[:, 5].float() == zeros[:, 0]).all()  # a never-active input's weights become exactly zero


def test_act_order_keeps_groups_contiguous_and_helps():
    w, h, x = _layer()
    plain = _output_error(x, w, *gptq(w, h, 4, 32, False), 32)
    ordered_codes, scales, zeros = gptq(w, h, 4, 32, False, act_order=True)
    assert scales.shape == (24, 4)  # one grid per run of 32 columns, whatever the order
    assert _output_error(x, w, ordered_codes, scales, zeros, 32) < 1.1 * plain
