"""Round-to-nearest int8 weights: the quantizer's error bound, the int8 matmul against
dequantize-then-matmul, the transformation on a tiny model (outputs close to float, weights int8 in
memory), and checkpoints that load back bit for bit."""

import pytest
import torch
from safetensors import safe_open

import babyllama.checkpoint as ckpt_io
from babyllama.infer import Engine, SamplingConfig
from babyllama.model import Llama
from babyllama.quant import Int8Linear, QuantizeInt8, quantize_rows
from babyllama.transforms import applied, apply_transforms
from tests.conftest import tiny_model_config


def test_rows_round_to_nearest_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different ranges
    w[3] = 0
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scales.shape == (16,)
    error = (q.float() * scales[:, None] - w).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    assert (q[3] == 0).all() and scales[3] == 1  # a zero row stays zero
    assert (q.abs().amax(dim=1)[torch.arange(16) != 3] == 127).all()  # each row uses its whole range
    q2, s2 = quantize_rows(q.float() * scales[:, None])  # quantized weights quantize to themselves
    assert torch.equal(q2, q) and torch.allclose(s2, scales)


def test_the_int8_matmul_equals_dequantize_then_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=False)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 7, 96)
    expected = x @ layer.dequantized().t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert (layer(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()  # and near the float layer
    with pytest.raises(ValueError, match="bias-free"):
        Int8Linear.from_linear(torch.nn.Linear(4, 4))


def test_a_quantized_model_stays_close_and_holds_int8_weights(tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    model = Llama(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        before = model(tokens)
    apply_transforms(model, [QuantizeInt8()])
    quantized = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == 4 * cfg.n_layers  # wqkv, wo, w13, w2: the projections as the Llama fuses them
    assert not any(isinstance(m, torch.nn.Linear) for name, m in model.named_modules()
                   if name.startswith("layers."))  # no float projection left behind
    assert model.output is not None and isinstance(model.output, torch.nn.Linear)  # the tied head stays
    with torch.no_grad():
        after = model(tokens)
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9

    ckpt_io.save_checkpoint(tmp_path / "run", 1, model, cfg, transforms=applied(model))
    ckpt = ckpt_io.find_checkpoint(tmp_path / "run")
    with safe_open(str(ckpt / ckpt_io.WEIGHTS), "pt") as f:
        assert f.get_tensor("layers.0.attention.wo.weight").dtype == torch.int8
    tokenizer.save(tmp_path / "run" / "tokenizer")
    loaded, _ = ckpt_io.load_model(tmp_path / "run")
    assert applied(loaded)[0]["name"] == "int8_rtn"
    with torch.no_grad():
        assert torch.equal(loaded(tokens), after)
    engine = Engine.load(tmp_path / "run", "cpu")  # generation prepares the quantized model for decoding
    reply = engine.generate([[1, 2, 3]], 5, SamplingConfig(temperature=0))
    assert len(reply[0]) == 5
