"""The low-bit matmul against dequantize-then-matmul, and the quantized linear layer built on it."""

import pytest
import torch

from babyllama.quant import QuantLinear
from babyllama.quant import kernels
from babyllama.quant.pack import pack


def _layer_parts(bits, out_features, in_features, group):
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), dtype=torch.uint8)
    scales = torch.rand(out_features, in_features // group) * 0.02 + 0.001
    offsets = -scales * torch.randint(0, 2 ** bits, scales.shape)
    return pack(codes, bits), scales, offsets


def test_the_kernel_is_built_on_this_cpu():
    # CI's machines have AVX2: a silent fall back to the slow path there would hide a broken build
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert kernels.kernel_available()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("group", [32, 64])
def test_the_kernel_equals_dequantize_then_matmul(bits, rows, group):
    packed, scales, offsets = _layer_parts(bits, 48, 128, group)
    x = torch.randn(rows, 128)
    weight = kernels.dequantize_rows(packed, scales, offsets, bits, group)
    expected = x @ weight.t()
    got = kernels.lowbit_matmul(x, packed, scales, offsets, bits, group)
    # the kernel rounds the activations to int8 in blocks of 32 (as llama.cpp does), each by at most
    # half a step, amax(block) / 254: so the error is bounded by sum_k |w_k| * that, per output
    half_step = x.abs().view(rows, -1, 32).amax(-1).repeat_interleave(32, dim=1) / 254
    bound = half_step @ weight.abs().t()
    assert ((got - expected).abs() <= bound * 1.001 + 1e-5).all()
    assert (got - expected).norm() / expected.norm() < 0.05  # and in practice far inside it
    # the portable path is exact up to float rounding
    exact = kernels.dequantized_matmul(x, packed, scales, offsets, bits, group)
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-5)


def test_a_quantized_layer_is_close_to_its_float_layer():
    linear = torch.nn.Linear(128, 40, bias=False)
    x = torch.randn(3, 6, 128)
    for bits, bound in ((8, 0.02), (4, 0.15)):
        layer = QuantLinear.from_linear(linear, bits, 32, sym=False)
        assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (40, 128 * bits // 8)
        y, ref = layer(x), linear(x)
        assert y.shape == ref.shape
        assert (y - ref).norm() / ref.norm() < bound
        torch.testing.assert_close(layer(x), (x @ layer.dequantized().t()), rtol=0.03, atol=0.03)


def test_outlier_columns_bypass_the_integer_path():
    linear = torch.nn.Linear(64, 16, bias=False)
    index = torch.tensor([3, 40])
    layer = QuantLinear.from_linear(linear, 8, 0, sym=True, outlier_index=index)
    assert torch.equal(layer.outlier_weight, linear.weight.detach()[:, index])
    assert (layer.dequantized()[:, index] == linear.weight.detach()[:, index]).all()
    x = torch.zeros(2, 64)
    x[:, index] = torch.tensor([[60.0, -45.0], [1e3, 7.0]])  # huge activations, only on the outlier columns
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-5)  # exactly the float product
    # and they no longer coarsen the others: a small input beside them is still multiplied accurately
    x[:, 10] = 0.01
    torch.testing.assert_close(layer(x), x @ layer.dequantized().t(), rtol=1e-4, atol=1e-4)


def test_bf16_models_keep_float32_scales():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 8, bias=False), 4, 32, sym=False).to(torch.bfloat16)
    assert layer.scales.dtype == torch.float32 and layer.offsets.dtype == torch.float32
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
