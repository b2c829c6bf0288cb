"""LoRA and DoRA as a transformation: equal to their formulas and to PEFT, merged equals unmerged,
only the adapter trains, its checkpoint is a PEFT adapter directory that names its base."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import babyllama.checkpoint as ckpt_io
from babyllama.adapters import LoRA, LoraLinear, count_parameters, merge_adapters
from babyllama.config import ConfigError, LoraConfig
from babyllama.model import Llama
from babyllama.transforms import applied, apply_transforms
from tests.conftest import tiny_model_config


def _base(tie=True, vocab=256):
    torch.manual_seed(0)
    return Llama(tiny_model_config(vocab_size=vocab, tie_embeddings=tie)).eval()


def _perturb(model, seed=1):
    """Trained-looking adapters: B (zero at start) and the DoRA magnitudes moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif ".lora_magnitude." in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif p.requires_grad and p.dim() == 1:  # trained norms
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif p.requires_grad and name == "tok_embeddings.rows":
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            elif p.requires_grad and "tok_embeddings" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _adapted(targets="all", dora=False, tie=True, train=(), token_rows=()):
    return _perturb(apply_transforms(_base(tie), [LoRA(rank=4, alpha=8, dropout=0.0, targets=targets, dora=dora,
                                                       train=train, token_rows=token_rows)]))


TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("targets,rows", [("all", ()), ("q,v", (4, 5)), ("k,up,down", (7,))])
def test_merged_equals_unmerged(targets, rows, dora):
    model = _adapted(targets, dora, token_rows=rows)
    with torch.no_grad():
        before = model(TOKENS)
        merged = merge_adapters(copy.deepcopy(model))
        after = merged(TOKENS)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules()) and applied(merged) == []
    assert merged.config.tie_embeddings == (targets != "all")  # an adapter on the head unties it
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert (before - _base()(TOKENS)).abs().max() > 1e-3  # the adapter changed something


def test_a_fresh_adapter_changes_nothing():
    for dora in (False, True):
        model = apply_transforms(_base(), [LoRA(dora=dora, dropout=0.0)])
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS), _base()(TOKENS))


def test_lora_is_its_formula_on_each_slice():
    """y = W x + (alpha / r) B A x on the targeted rows of the fused projection, W x elsewhere."""
    model = _adapted("q,v")
    wqkv = model.layers[0].attention.wqkv
    x = torch.randn(3, 64)
    w = wqkv.base.weight.detach()
    expected = x @ w.T
    for t in ("q", "v"):
        start, end = wqkv.slices[t]
        expected[:, start:end] += 2.0 * x @ (wqkv.lora_B[t] @ wqkv.lora_A[t]).T.detach()
    torch.testing.assert_close(wqkv(x).detach(), expected, rtol=1e-5, atol=1e-5)


def test_dora_is_the_paper_formula():
    """W' = m (W + s B A) / ||W + s B A|| with the norm per output row (Liu et al. 2024, eq. 5)."""
    model = _adapted("o", dora=True)
    wo = model.layers[1].attention.wo
    w, s = wo.base.weight.detach(), 2.0
    v = w + s * (wo.lora_B["o"] @ wo.lora_A["o"]).detach()
    direction = v / v.norm(dim=1, keepdim=True)
    expected_w = wo.lora_magnitude["o"].detach()[:, None] * direction
    x = torch.randn(5, 64)
    torch.testing.assert_close(wo(x).detach(), x @ expected_w.T, rtol=1e-5, atol=1e-5)
    # magnitude starts at the base's row norms, so a fresh DoRA is the base
    fresh = apply_transforms(_base(), [LoRA(dora=True, targets="o")]).layers[1].attention.wo
    torch.testing.assert_close(fresh.lora_magnitude["o"].detach(), fresh.base.weight.norm(dim=1).detach())


@pytest.mark.parametrize("train,rows", [((), ()), (("norms",), (4, 5)), (("norms", "embeddings"), (4, 5))])
def test_gradients_reach_only_what_trains(train, rows):
    model = apply_transforms(_base(), [LoRA(rank=4, dora=True, train=train, token_rows=rows)]).train()
    assert (type(model.tok_embeddings).__name__ == "TrainedRows") == bool(rows and "embeddings" not in train)
    loss = model(TOKENS, TOKENS)
    loss.backward()
    for name, p in model.named_parameters():
        wanted = ".lora_" in name or ("norms" in train and p.dim() == 1) or \
            ("embeddings" in train and name == "tok_embeddings.weight") or name == "tok_embeddings.rows"
        assert p.requires_grad == wanted, name
        assert (p.grad is not None) == wanted, name
    trainable, total = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert trainable >= lora and (trainable == lora) == (train == ())


def test_trained_rows_move_only_their_rows_in_the_embedding_and_the_tied_head():
    model = _adapted("o", token_rows=(4, 5))
    base = _base()
    with torch.no_grad():
        changed = (model.tok_embeddings.weight - base.tok_embeddings.weight).abs().sum(dim=1).nonzero().flatten()
        assert changed.tolist() == [4, 5]
        torch.testing.assert_close(model.output.loss_weight(), model.tok_embeddings.weight)
        x = torch.randn(3, 64)
        torch.testing.assert_close(model.output(x), x @ model.tok_embeddings.weight.T)
    # the fused head + loss takes the trained rows too: the loss equals the logits' cross-entropy
    logits = model(TOKENS)
    reference = F.cross_entropy(logits.flatten(0, 1), TOKENS.flatten(), reduction="sum")
    torch.testing.assert_close(model(TOKENS, TOKENS), reference, rtol=1e-5, atol=1e-3)


def test_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="--lora-targets: unknown 'qkv'"):
        LoraConfig(targets="qkv,o")
    with pytest.raises(ConfigError, match="lora.rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="--lora-train: unknown 'head'"):
        LoraConfig(train="head")
    assert LoraConfig(targets="all").targets == ("q", "k", "v", "o", "gate", "up", "down", "head") == LoraConfig().targets
    with pytest.raises(ConfigError, match="--lora-tokens"):
        LoraConfig(tokens="im_end")
    assert LoraConfig().token_rows((5, 4)) == [4, 5] and LoraConfig(tokens="none").token_rows((4, 5)) == []
    assert LoraConfig(tokens="7,3").token_rows((4,)) == [3, 7]
    assert LoraConfig(train="embeddings").token_rows((4, 5)) == []  # every row trains already
    with pytest.raises(ConfigError, match="past the vocabulary"):
        apply_transforms(_base(), [LoRA(token_rows=[256])])
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_transforms(_adapted(), [LoRA()])


# --- checkpoints and PEFT -------------------------------------------------------------------------

def _save_adapter(tmp_path, model, base_model, step=3):
    base = ckpt_io.save_checkpoint(tmp_path / "base", 1, base_model, base_model.config)
    weights = ckpt_io.trained_state(model, ckpt_io.model_state(model))
    ckpt = ckpt_io.save_checkpoint(tmp_path / "adapter", step, weights, model.config, transforms=applied(model),
                                   base=str(base))
    return base, ckpt


@pytest.mark.parametrize("dora", [False, True])
def test_an_adapter_checkpoint_is_small_names_its_base_and_loads_back(tmp_path, dora):
    model = _adapted("q,k,v,o,gate", dora=dora, train=("norms",))
    base, ckpt = _save_adapter(tmp_path, model, _base())
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "checksums.json", "config.json"]
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["base"] == str(base) and meta["base_weights_sha256"] == ckpt_io.weights_fingerprint(base)
    state = ckpt_io.load_state_file(ckpt)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    loaded, _ = ckpt_io.load_model(tmp_path / "adapter")
    assert applied(loaded) == applied(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS))
        merged, _ = ckpt_io.load_model(tmp_path / "adapter", merge=True)
        torch.testing.assert_close(merged(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)


def test_an_adapter_on_another_base_is_refused(tmp_path):
    model = _adapted()
    base, _ = _save_adapter(tmp_path, model, _base())
    other = _base()
    with torch.no_grad():
        other.norm.weight.mul_(1.01)
    ckpt_io.save_checkpoint(tmp_path / "base", 1, other, other.config)  # the same path, other weights
    with pytest.raises(ckpt_io.CheckpointError, match="trained over other weights"):
        ckpt_io.load_model(tmp_path / "adapter")
    ckpt_io.save_checkpoint(tmp_path / "moved", 1, _base(), other.config)
    loaded, _ = ckpt_io.load_model(tmp_path / "adapter", base=tmp_path / "moved")  # the right weights, moved
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS))


def _peft_model(hf, adapter_dir):
    peft = pytest.importorskip("peft")
    return peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()


@pytest.mark.parametrize("dora,tie,train,targets,rows", [
    (False, True, (), "all", ()),
    (True, True, (), "all", ()),
    (False, False, ("norms", "embeddings"), "q,v,down", ()),
    (True, True, ("norms", "embeddings"), "k,o,up", ()),
    (False, True, (), "all", (4, 5)),
    (True, False, ("norms",), "q,v", (3, 9)),
])
def test_peft_loads_our_adapter_and_gives_our_logits(tmp_path, dora, tie, train, targets, rows):
    from babyllama.export.hf import to_hf_model

    model = _adapted(targets, dora=dora, tie=tie, train=train, token_rows=rows)
    _, ckpt = _save_adapter(tmp_path, model, _base(tie))
    peft_model = _peft_model(to_hf_model(_base(tie)), ckpt)
    with torch.no_grad():
        theirs = peft_model(TOKENS).logits
        torch.testing.assert_close(theirs, model(TOKENS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_gradients_equal_ours(tmp_path, dora):
    """The same adapter, trained one step by PEFT and by us: the same gradients (DoRA's norm detached in both)."""
    from babyllama.adapters.peft import to_peft_name
    from babyllama.export.hf import to_hf_model

    # the head goes through the fused loss; PEFT 0.21 cannot put DoRA on a head whose rows also train
    model = _adapted("q,v,gate,down,head", dora=dora, token_rows=() if dora else (4, 5))
    _, ckpt = _save_adapter(tmp_path, model, _base())
    peft_model = _peft_model(to_hf_model(_base()), ckpt)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    theirs = {n.replace(".default", ""): p for n, p in peft_model.named_parameters()
              if "lora_" in n or "trainable_tokens_delta" in n}
    for p in theirs.values():
        p.requires_grad_(True)
    targets = TOKENS.roll(-1, 1)
    F.cross_entropy(peft_model(TOKENS).logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    model(TOKENS, targets).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            peft_name = to_peft_name(name).replace("lora_magnitude_vector", "lora_magnitude_vector.weight")
            peft_name = peft_name.replace(".weight.weight", ".weight")
            torch.testing.assert_close(theirs[peft_name].grad, p.grad, rtol=1e-4, atol=1e-5)


def test_a_peft_adapter_imports_and_gives_peft_logits(tmp_path, tokenizer):
    """An adapter PEFT trained (here: initialised at random) on our model's export, imported as an adapter run."""
    peft = pytest.importorskip("peft")
    from babyllama.cli import main
    from babyllama.export.hf import to_hf_model

    torch.manual_seed(0)
    base = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size)).eval()
    ckpt_io.save_checkpoint(tmp_path / "base", 1, base, base.config)
    tokenizer.save(tmp_path / "base" / "tokenizer")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"],
                             use_dora=True, init_lora_weights=False, modules_to_save=["norm"],
                             trainable_token_indices=[4, 5])
    peft_model = peft.get_peft_model(to_hf_model(base), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    assert main(["lora", "import", "--peft", str(tmp_path / "peft"), "--base", str(tmp_path / "base"),
                 "--out", str(tmp_path / "imported")]) == 0
    ours, _ = ckpt_io.load_model(tmp_path / "imported")
    tokens = TOKENS % tokenizer.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), peft_model(tokens).logits, rtol=1e-4, atol=1e-4)
    record = applied(ours)[0]
    assert record["dora"] and record["targets"] == ["q", "v", "o", "up"] and record["alpha"] == 16
    assert record["token_rows"] == [4, 5] and record["train"] == ["norms"]
    # and back out: merged into plain weights, the same logits
    assert main(["lora", "merge", "--ckpt", str(tmp_path / "imported"), "--out", str(tmp_path / "merged")]) == 0
    merged, ckpt = ckpt_io.load_model(tmp_path / "merged")
    assert (ckpt / "model.safetensors").is_file() and applied(merged) == []
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), peft_model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_peft_adapters_we_cannot_reproduce_are_refused(tmp_path):
    from babyllama.adapters.peft import settings_from_peft

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "all"}))
    with pytest.raises(ConfigError, match="bias = 'all' is not supported"):
        settings_from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens"]}))
    with pytest.raises(ConfigError, match="target_modules"):
        settings_from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="peft_type 'IA3' is not LORA"):
        settings_from_peft(tmp_path)
