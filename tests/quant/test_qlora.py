"""LoRA over a quantized base (QLoRA): gradients through the packed layers, adapters that train,
save as an adapter run over the quantized run, and load back to the same outputs."""

import json

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.cli import main
from babyllama.quant import QuantLinear


def test_gradients_flow_through_a_quantized_layer():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 96, bias=False), 4, 32, sym=False)
    x = torch.randn(5, 64, requires_grad=True)
    grad = torch.randn(5, 96)
    (layer(x) * grad).sum().backward()
    torch.testing.assert_close(x.grad, grad @ layer.dequantized(), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())  # the codes are buffers: nothing of it trains


@pytest.fixture(scope="module")
def qlora_run(float_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    assert main(["quantize", "--ckpt", str(float_run), "--out", str(root / "q4"), "--group-size", "32"]) == 0
    rows = [{"question": f"第{i}个问题是什么？", "response": "答案是好。"} for i in range(64)]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert main(["sft", "--ckpt", str(root / "q4"), "--data", str(root / "sft.jsonl"), "--out", str(root / "qlora"),
                 "--lora", "--device", "cpu", "--max-steps", "30", "--lr", "3e-3", "--batch-size", "8",
                 "--set", "train.eval_interval=30", "--set", "train.warmup_steps=3"]) == 0
    return root


def test_lora_trains_over_a_quantized_base(qlora_run):
    losses = [json.loads(line)["loss"] for line in (qlora_run / "qlora" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.6 * losses[0]  # measured 5.57 -> 2.86
    ckpt = ckpt_io.find_checkpoint(qlora_run / "qlora")
    meta = ckpt_io.read_meta(ckpt)
    assert meta["base"] and [r["name"] for r in meta["transforms"]] == ["quantize", "lora"]
    model, _ = ckpt_io.load_model(qlora_run / "qlora", merge=True)  # adapters stay over the codes
    wrapped = model.layers[0].attention.wqkv
    assert isinstance(wrapped.base, QuantLinear) and float(wrapped.lora_B["q"].abs().sum()) > 0
    base, _ = ckpt_io.load_model(qlora_run / "q4")
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(model(tokens), base(tokens))  # the adapter changes the outputs


def test_a_quantized_run_is_not_fully_fine_tuned(qlora_run, tmp_path, capsys):
    assert main(["sft", "--ckpt", str(qlora_run / "q4"), "--data", str(qlora_run / "sft.jsonl"),
                 "--out", str(tmp_path / "full"), "--device", "cpu", "--max-steps", "2"]) == 2
    assert "is quantized: its integer weights do not train" in capsys.readouterr().err
    assert main(["sft", "--ckpt", str(qlora_run / "q4"), "--data", str(qlora_run / "sft.jsonl"),
                 "--out", str(tmp_path / "dora"), "--dora", "--device", "cpu", "--max-steps", "2"]) == 2
    assert "DoRA needs the float weights" in capsys.readouterr().err


def test_dpo_with_lora_runs_over_a_quantized_base(qlora_run, tmp_path):
    pairs = [{"prompt": f"问题{i}", "chosen": "答案是好。", "rejected": "答案是坏。"} for i in range(24)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs), encoding="utf-8")
    assert main(["dpo", "--ckpt", str(qlora_run / "q4"), "--data", str(tmp_path / "pairs.jsonl"), "--out",
                 str(tmp_path / "dpo"), "--lora", "--device", "cpu", "--max-steps", "6", "--lr", "1e-3"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and losses[-1] < 0.69  # below ln 2: the policy moved away from its quantized reference
    model, _ = ckpt_io.load_model(tmp_path / "dpo")
    assert isinstance(model.layers[0].attention.wqkv.base, QuantLinear)
