"""BitNet b1.58: the ternary forward and its straight-through gradients, quantization-aware
training from a float run, and the packed 2-bit model computing what the trained one computed."""

import json

import pytest
import torch
import torch.nn.functional as F

import babyllama.checkpoint as ckpt_io
from babyllama.cli import main
from babyllama.quant import BitLinear, QuantLinear
from babyllama.quant.bitnet import int8_per_token, ternary


def test_the_forward_is_ternary_weights_on_int8_activations_with_straight_through_gradients():
    layer = BitLinear(64, 24, bias=False)
    x = torch.randn(3, 5, 64, requires_grad=True)
    values, scale = ternary(layer.weight.detach())
    assert set(values.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert scale == pytest.approx(float(layer.weight.detach().abs().mean()))
    xq = int8_per_token(x.detach())
    assert ((xq - x.detach()).abs() <= x.detach().abs().amax(-1, keepdim=True) / 254 + 1e-6).all()
    y = layer(x)
    torch.testing.assert_close(y, F.linear(xq, values * scale))
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    # straight through: the rounding is the identity backwards
    torch.testing.assert_close(layer.weight.grad, grad.reshape(-1, 24).t() @ xq.reshape(-1, 64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, grad @ (values * scale), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def bitnet_runs(float_run, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bitnet")
    assert main(["pretrain", "--init", str(float_run), "--bitnet", "--data", str(data_dir), "--out", str(root / "qat"),
                 "--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
                 "--set", "model.n_kv_heads=2", "--seq-len", "64", "--device", "cpu", "--max-steps", "40", "--batch-size", "8", "--lr", "2e-3",
                 "--set", "train.warmup_steps=4", "--set", "train.eval_interval=40", "--set", "train.eval_batches=2"]) == 0
    assert main(["quantize", "--ckpt", str(root / "qat"), "--out", str(root / "packed"), "--method", "bitnet"]) == 0
    return root


def test_quantization_aware_training_learns_and_records_itself(bitnet_runs):
    records = [json.loads(line) for line in (bitnet_runs / "qat" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0] - 0.05  # held-out loss falls from the float weights' ternary image
    meta = ckpt_io.read_meta(ckpt_io.find_checkpoint(bitnet_runs / "qat"))
    assert [r["name"] for r in meta["transforms"]] == ["bitnet"]
    model, _ = ckpt_io.load_model(bitnet_runs / "qat")
    assert isinstance(model.layers[0].feed_forward.w2, BitLinear)


def test_the_packed_model_computes_what_the_trained_one_did(bitnet_runs):
    trained, _ = ckpt_io.load_model(bitnet_runs / "qat")
    packed, ckpt = ckpt_io.load_model(bitnet_runs / "packed")
    layer = packed.layers[0].attention.wqkv
    assert isinstance(layer, QuantLinear) and layer.bits == 2 and int(layer.codes().max()) <= 2
    values, scale = ternary(trained.layers[0].attention.wqkv.weight.detach())
    torch.testing.assert_close(layer.dequantized(), values * scale)  # exactly the trained ternary weights
    assert type(packed.output) is torch.nn.Linear  # the head stays float, as in the paper
    tokens = torch.randint(0, trained.config.vocab_size, (2, 32))
    with torch.no_grad():
        a, b = trained(tokens), packed(tokens)
    # only the activation rounding differs (per token while training, per block of 32 in the kernel)
    assert (a - b).norm() / a.norm() < 0.05
    manifest = json.loads((bitnet_runs / "packed" / "quantization.json").read_text())
    assert manifest["method"] == "bitnet" and manifest["bits"] == 2
