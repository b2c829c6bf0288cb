"""Transformations: applied from outside in a defined order, recorded, reapplied on loading; an
adapter's checkpoint holds only what it trains; the decoding layout keeps an adapter it meets."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import babyllama.checkpoint as ckpt_io
from babyllama.config import ConfigError
from babyllama.infer.decode import DecodeLayout, DecodeLinear, prepare_for_decoding
from babyllama.model import Llama
from babyllama.transforms import ADAPTER, applied, apply_transforms, register, replace_modules
from tests.conftest import tiny_model_config


class ScaledLinear(nn.Module):
    """A made-up adapter: the frozen linear, then a trained per-output scale."""

    def __init__(self, base: nn.Module, out_features: int):
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return self.base(x) * self.scale


@register
class ScaleAdapter:
    name, order, trains_own_params = "test_scale_adapter", ADAPTER, True

    def __init__(self, targets: list[str]):
        self.targets = list(targets)

    def settings(self):
        return {"targets": self.targets}

    def apply(self, model):
        for p in model.parameters():
            p.requires_grad_(False)
        replace_modules(model, lambda name, m: ScaledLinear(m, m.out_features)
                        if type(m) is nn.Linear and name.split(".")[-1] in self.targets else None)


def _model(tie=True):
    torch.manual_seed(0)
    return Llama(tiny_model_config(tie_embeddings=tie)).eval()


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.uniform_(0.5, 1.5)


def test_an_adapter_survives_the_decoding_layout():
    model = apply_transforms(_model(), [ScaleAdapter(["wqkv", "w2", "output"])])
    _perturb(model)
    tokens = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        expected = model(tokens)
        fast = prepare_for_decoding(copy.deepcopy(model), compiled=False)
        got = fast(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    wrapped = [m for m in fast.modules() if isinstance(m, ScaledLinear)]
    assert len(wrapped) == 2 * 2 + 1 and all(isinstance(m.base, DecodeLinear) for m in wrapped)
    assert [r["name"] for r in applied(fast)] == ["test_scale_adapter", "decode_layout"]


def test_transformations_compose_in_their_order_only():
    model = apply_transforms(_model(), [DecodeLayout(compiled=False), ScaleAdapter(["w2"])])  # sorted by order
    assert [r["name"] for r in applied(model)] == ["test_scale_adapter", "decode_layout"]
    with pytest.raises(ConfigError, match="'test_scale_adapter' must come before decode_layout"):
        apply_transforms(model, [ScaleAdapter(["wo"])])


@pytest.mark.parametrize("tie", [True, False])
def test_a_wrapped_lm_head_gives_the_same_loss_as_its_logits(tie):
    model = apply_transforms(_model(tie), [ScaleAdapter(["output"])])
    _perturb(model)
    tokens, targets = torch.randint(0, 1024, (2, 10)), torch.randint(0, 1024, (2, 10))
    targets[0, :4] = -100
    logits = model(tokens).float()
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                reduction="none").view(2, 10)
    torch.testing.assert_close(model(tokens, targets), reference.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model(tokens, targets, reduction="none"), reference, rtol=1e-5, atol=1e-5)


def test_an_adapter_checkpoint_holds_only_what_it_trains_and_loads_back(tmp_path):
    base = _model(tie=False)
    base_ckpt = ckpt_io.save_checkpoint(tmp_path / "base", 1, base, base.config)
    model = apply_transforms(copy.deepcopy(base), [ScaleAdapter(["wqkv", "output"])])
    _perturb(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"layers.0.attention.wqkv.scale", "layers.1.attention.wqkv.scale", "output.scale"}
    weights = ckpt_io.trained_state(model, ckpt_io.model_state(model))
    ckpt = ckpt_io.save_checkpoint(tmp_path / "adapter", 5, weights, model.config, transforms=applied(model),
                                   base=str(base_ckpt))
    assert set(ckpt_io.load_state_file(ckpt)) == set(weights) and len(weights) == 3
    loaded, _ = ckpt_io.load_model(tmp_path / "adapter")
    tokens = torch.randint(0, 1024, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))
    assert applied(loaded) == applied(model)


def test_a_checkpoint_of_an_unknown_transformation_is_refused_by_name(tmp_path):
    model = _model()
    ckpt_io.save_checkpoint(tmp_path, 1, model, model.config, transforms=[{"name": "quantum_lora", "rank": 8}])
    with pytest.raises(ConfigError, match="transformation 'quantum_lora', which this babyllama does not have"):
        ckpt_io.load_model(tmp_path)


def test_tied_checkpoints_store_the_embedding_once_and_load_either_way(tmp_path):
    model = _model(tie=True)
    assert model.output.weight is model.tok_embeddings.weight
    ckpt = ckpt_io.save_checkpoint(tmp_path, 1, model, model.config)
    from safetensors.torch import load_file

    assert "output.weight" not in load_file(str(ckpt / "model.safetensors"))
    loaded, _ = ckpt_io.load_model(tmp_path)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    torch.testing.assert_close(loaded.output.weight, model.output.weight)


def test_the_trainer_saves_and_resumes_only_what_an_adapter_trains(tmp_path):
    from babyllama.config import TrainConfig
    from babyllama.train.loop import Trainer
    from tests.train.helpers import FixedBatches, random_batches

    base = _model(tie=False)
    base_ckpt = ckpt_io.save_checkpoint(tmp_path / "base", 1, base, base.config)
    batches = random_batches(4, 2, 16, 1024, seed=3)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, warmup_steps=0, log_interval=1, eval_interval=100,
                      ckpt_interval=2, device="cpu", dtype="float32", keep_ckpts=0)

    def run(out, stop=None, resume=False):
        model = apply_transforms(copy.deepcopy(base), [ScaleAdapter(["wo", "output"])])
        trainer = Trainer(model, model.config, cfg, FixedBatches(batches), out, progress=False,
                          base_checkpoint=base_ckpt)
        if resume:
            assert trainer.resume()
        trainer.fit(stop)
        return model

    whole = run(tmp_path / "whole")
    run(tmp_path / "paused", stop=2)
    resumed = run(tmp_path / "paused", resume=True)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    ckpt = ckpt_io.find_checkpoint(tmp_path / "whole")
    assert sorted(ckpt_io.load_state_file(ckpt)) == ["layers.0.attention.wo.scale", "layers.1.attention.wo.scale",
                                                     "output.scale"]
    assert not torch.equal(whole.output.scale, torch.ones_like(whole.output.scale))  # it trained
    loaded, _ = ckpt_io.load_model(tmp_path / "whole")
    tokens = torch.randint(0, 1024, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), whole.eval()(tokens))
    with pytest.raises(ValueError, match="base_checkpoint"):
        Trainer(apply_transforms(copy.deepcopy(base), [ScaleAdapter(["wo"])]), base.config, cfg,
                FixedBatches(batches), tmp_path / "x", progress=False)
