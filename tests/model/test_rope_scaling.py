"""RoPE scalings against transformers: the inverse frequencies and attention factors of its RoPE
initialisation functions, and our model against the exported LlamaForCausalLM with the same
`rope_parameters` at lengths past the trained one (dynamic NTK during cached generation too)."""

import dataclasses

import pytest
import torch

from babyllama.config import ConfigError
from babyllama.export.hf import hf_config, to_hf_model
from babyllama.model import Llama
from babyllama.model.rope import ClexScaling, ntk_theta, rope_inv_freq, scaled_inv_freq
from tests.conftest import tiny_model_config

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

TRAINED = 64  # tiny_model_config's max_seq_len: the "original" length of these tests


def scaled_config(kind, factor=4.0, **kw):
    return tiny_model_config().with_rope_scaling(kind, factor, **kw)


def hf_frequencies(cfg, seq_len=None):
    hf_cfg = hf_config(cfg)
    rope_type = hf_cfg.rope_parameters["rope_type"]
    fn = ROPE_INIT_FUNCTIONS[rope_type] if rope_type != "default" else None
    if fn is None:  # transformers' default: theta^(-2i/d), computed in float32
        theta = hf_cfg.rope_parameters["rope_theta"]
        d = cfg.head_dim
        return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0
    return fn(hf_cfg, "cpu", seq_len=seq_len) if seq_len is not None else fn(hf_cfg, "cpu")


@pytest.mark.parametrize("kind,factor", [("none", 1.0), ("linear", 2.0), ("linear", 8.0), ("ntk", 4.0),
                                         ("yarn", 2.0), ("yarn", 4.0), ("yarn", 16.0)])
def test_fixed_scalings_equal_transformers(kind, factor):
    cfg = scaled_config(kind, factor)
    ours, attention = scaled_inv_freq(kind, cfg.head_dim, cfg.rope_theta, factor, cfg.trained_len)
    theirs, their_attention = hf_frequencies(cfg)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(their_attention, rel=1e-12)
    if kind == "yarn":  # the paper's temperature, and the ramp really mixes kept and interpolated dims
        assert attention == pytest.approx(0.1 * torch.log(torch.tensor(factor)).item() + 1)
        base = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        assert ours[0] == base[0] and ours[-1] == pytest.approx(base[-1] / factor)


@pytest.mark.parametrize("beta_fast,beta_slow,original", [(32, 1, 64), (16, 2, 256), (64, 1, 4096)])
def test_yarn_parameters_equal_transformers(beta_fast, beta_slow, original):
    cfg = dataclasses.replace(tiny_model_config(dim=256, n_heads=4), rope_beta_fast=float(beta_fast),
                              rope_beta_slow=float(beta_slow)).with_rope_scaling("yarn", 8.0, original=original)
    ours, attention = scaled_inv_freq("yarn", cfg.head_dim, cfg.rope_theta, 8.0, original, None, beta_fast, beta_slow)
    theirs, their_attention = hf_frequencies(cfg)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(their_attention)


@pytest.mark.parametrize("seq_len", [10, 64, 65, 100, 256, 1000])
def test_dynamic_ntk_equals_transformers_at_every_length(seq_len):
    cfg = scaled_config("dynamic-ntk", 4.0)
    ours, _ = scaled_inv_freq("dynamic-ntk", cfg.head_dim, cfg.rope_theta, 4.0, TRAINED, seq_len)
    theirs, _ = hf_frequencies(cfg, seq_len=seq_len)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    assert torch.equal(ours, plain) == (seq_len <= TRAINED)


def test_ntk_is_a_larger_base():
    d = 16
    assert torch.allclose(scaled_inv_freq("ntk", d, 10000.0, 4.0)[0], rope_inv_freq(d, ntk_theta(10000.0, d, 4.0)))
    assert ntk_theta(10000.0, d, 4.0) == pytest.approx(10000.0 * 4 ** (16 / 14))


def random_model(cfg):
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kind", ["none", "linear", "ntk", "dynamic-ntk", "yarn"])
def test_model_equals_transformers_past_the_trained_length(kind):
    """At 3x the trained length, in one forward pass: every scaling's tables equal transformers'."""
    torch.manual_seed(1)
    model = random_model(scaled_config(kind, 4.0, max_seq_len=4 * TRAINED))
    hf = to_hf_model(model)
    tokens = torch.randint(0, 1024, (2, 3 * TRAINED))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dynamic-ntk", "clex"])
def test_dynamic_scaling_keeps_the_cache_correct_across_the_switch(kind):
    """Cached decoding from inside the trained length to past it: each step's logits equal a full
    forward pass over the same tokens (the cached keys are re-rotated when the frequencies change)."""
    torch.manual_seed(2)
    model = random_model(scaled_config(kind, 4.0))
    if kind == "clex":  # a trained-looking ODE, not the NTK start
        torch.nn.init.normal_(model.rope.clex.down.weight, std=0.5)
    tokens = torch.randint(0, 1024, (1, TRAINED + 20))
    cache = model.new_cache(1)
    prompt = TRAINED - 8
    with torch.no_grad():
        logits = model(tokens[:, :prompt], cache=cache)[:, -1]
        steps = [logits]
        for pos in range(prompt, tokens.shape[1] - 1):
            steps.append(model(tokens[:, pos:pos + 1], cache=cache, start_pos=pos)[:, -1])
        for i, step in enumerate(steps):
            full = model(tokens[:, :prompt + i])[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_dynamic_scaling_with_left_padded_rows():
    """Rows of unequal length share a left-padded cache; each row's keys are re-rotated at its own
    positions: every step's logits equal the row's full forward pass."""
    from babyllama.model.kv_cache import KVCache

    torch.manual_seed(6)
    model = random_model(scaled_config("dynamic-ntk", 4.0))
    long, short = torch.randint(0, 1024, (TRAINED + 16,)), torch.randint(0, 1024, (TRAINED + 6,))
    prompt_long, prompt_short = 40, 30
    pad = prompt_long - prompt_short
    cache = model.new_cache(2)
    cache.set_padding(torch.tensor([0, pad]))
    batch = torch.stack([long[:prompt_long], torch.cat([torch.zeros(pad, dtype=torch.long), short[:prompt_short]])])
    with torch.no_grad():
        logits = model(batch, cache=cache)[:, -1]
        for step in range(len(short) - prompt_short):
            for row, (seq, length) in enumerate(((long, prompt_long + step), (short, prompt_short + step))):
                full = model(seq[None, :length])[:, -1]
                torch.testing.assert_close(logits[row], full[0], rtol=1e-4, atol=1e-4)
            nxt = torch.stack([long[prompt_long + step], short[prompt_short + step]])[:, None]
            logits = model(nxt, cache=cache, start_pos=prompt_long + step)[:, -1]


def test_dynamic_ntk_generation_equals_transformers_without_cache():
    """transformers' own cached generation keeps keys rotated at their old length; its uncached
    forward is the exact computation, and our cached greedy decoding gives its tokens and logits."""
    torch.manual_seed(3)
    model = random_model(scaled_config("dynamic-ntk", 4.0))
    hf = to_hf_model(model)
    tokens = torch.randint(0, 1024, (1, TRAINED - 4))
    cache = model.new_cache(1)
    with torch.no_grad():
        logits = model(tokens, cache=cache)[:, -1]
        for _ in range(12):
            theirs = hf(input_ids=tokens, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, theirs, rtol=1e-4, atol=1e-4)
            nxt = logits.argmax(-1, keepdim=True)
            assert torch.equal(nxt, theirs.argmax(-1, keepdim=True))
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = model(nxt, cache=cache, start_pos=tokens.shape[1] - 1)[:, -1]


def test_scaled_config_records_the_trained_length():
    cfg = tiny_model_config(max_seq_len=256).with_rope_scaling("yarn", 4.0)
    assert (cfg.rope_original_len, cfg.max_seq_len, cfg.trained_len) == (256, 1024, 256)
    again = cfg.with_rope_scaling("linear", 2.0)  # rescaling a scaled model starts from its trained length
    assert (again.rope_original_len, again.max_seq_len) == (256, 1024)
    with pytest.raises(ConfigError, match="model.rope_scaling must be one of"):
        dataclasses.replace(cfg, rope_scaling="rope2")
    with pytest.raises(ConfigError, match="model.rope_factor"):
        dataclasses.replace(cfg, rope_factor=0.5)


def test_hf_export_refuses_clex():
    with pytest.raises(ConfigError, match="'clex' has no equivalent in transformers"):
        hf_config(scaled_config("clex"))


def test_clex_starts_as_ntk_and_stays_monotone_in_the_factor():
    d = 16
    clex = ClexScaling(d, 10000.0)
    for scale in (1.0, 2.0, 4.0, 16.0):  # untrained: exactly NTK-aware scaling with factor = scale
        torch.testing.assert_close(clex.inv_freq(scale).double(), scaled_inv_freq("ntk", d, 10000.0, scale)[0],
                                   rtol=1e-5, atol=0)
    torch.manual_seed(0)
    for p in clex.parameters():  # any learned dynamics
        torch.nn.init.normal_(p, std=1.0)
    with torch.no_grad():
        freqs = torch.stack([clex.inv_freq(s) for s in torch.linspace(1, 32, 40).tolist()])
    assert (freqs[1:] <= freqs[:-1] + 1e-7).all()  # every frequency falls (or stays) as the factor grows
    assert not torch.allclose(freqs[-1], scaled_inv_freq("ntk", d, 10000.0, 32.0)[0].float(), rtol=1e-2)


def test_clex_trains_a_step():
    torch.manual_seed(4)
    model = Llama(scaled_config("clex", 4.0)).train()
    model.rope.clex_scale = 3.0  # as a training step samples it
    tokens = torch.randint(0, 1024, (2, 3 * TRAINED + 1))
    before = model.rope.clex.inv_freq(3.0).detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert model.rope.clex.down.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.allclose(model.rope.clex.inv_freq(3.0), before)
    assert "rope.clex.down.weight" in model.state_dict()
