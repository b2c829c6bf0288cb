"""Sampling settings are checked when made; sample_next returns valid ids for any logits."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from babyllama.config import ConfigError
from babyllama.infer.sampling import SamplingConfig, filter_top_k, filter_top_p, sample_next

SETTINGS = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=1.5), "--top-p must be in (0, 1] (1 disables; for greedy decoding use --temperature 0), got 1.5"),
    (dict(top_p=0), "--top-p must be in (0, 1]"),
    (dict(top_p=-0.1), "--top-p must be in (0, 1]"),
    (dict(top_p=math.nan), "--top-p must be in (0, 1]"),
    (dict(temperature=math.nan), "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (dict(temperature=-1.0), "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (dict(temperature=math.inf), "--temperature must be a finite number >= 0"),
    (dict(top_k=-1), "--top-k must be an integer >= 0 (0 disables), got -1"),
    (dict(top_k=2.5), "--top-k must be an integer >= 0"),
    (dict(repetition_penalty=0), "--repetition-penalty must be a finite number > 0 (1 disables), got 0"),
    (dict(repetition_penalty=-1.1), "--repetition-penalty must be a finite number > 0"),
    (dict(repetition_penalty=math.inf), "--repetition-penalty must be a finite number > 0"),
    (dict(seed=-1), "--seed must be an integer in [0, 2**64), got -1"),
    (dict(top_p=10**400), "--top-p must be in (0, 1]"),  # a huge int is compared, not turned into a float
])
def test_bad_settings_name_the_flag(kwargs, message):
    """--top-p 0, --repetition-penalty 0 and --temperature nan used to crash in torch.multinomial."""
    with pytest.raises(ConfigError) as err:
        SamplingConfig(**kwargs)
    assert message in str(err.value)


def test_edge_settings_are_valid():
    SamplingConfig(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0)
    SamplingConfig(temperature=1e-30, top_p=1e-9, repetition_penalty=1e-9, seed=2**64 - 1)


def _draw(logits, cfg, n=1, context=None):
    g = torch.Generator().manual_seed(0)
    return torch.stack([sample_next(logits, cfg, context=context, generator=g) for _ in range(n)])


def test_extreme_logits_give_valid_ids():
    cfg = SamplingConfig(temperature=0.7, top_k=3, top_p=0.5)
    huge = torch.tensor([[3e38, -3e38, 1e30, 0.0]])
    assert set(_draw(huge, cfg, 50).flatten().tolist()) == {0}
    one_left = torch.full((2, 6), float("-inf"))
    one_left[0, 4], one_left[1, 1] = -1e4, 7.0
    assert _draw(one_left, cfg, 20).tolist() == [[4, 1]] * 20
    with_inf = torch.tensor([[float("inf"), 1.0, float("-inf")], [float("nan"), 0.0, float("nan")]])
    assert _draw(with_inf, cfg, 20).tolist() == [[0, 1]] * 20  # +inf wins, NaN is never chosen
    none_left = torch.full((1, 5), float("-inf"))
    assert ((_draw(none_left, cfg, 20) >= 0) & (_draw(none_left, cfg, 20) < 5)).all()  # uniform, not a crash
    bf16 = torch.randn(3, 50).mul(1e3).to(torch.bfloat16)
    assert _draw(bf16, cfg, 5).shape == (5, 3)
    greedy = SamplingConfig(temperature=0)
    assert sample_next(torch.tensor([[float("nan"), 1.0, 2.0]]), greedy).tolist() == [2]


def test_tiny_temperature_is_greedy_and_huge_is_uniform():
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")]])
    assert set(_draw(logits, SamplingConfig(temperature=1e-45, top_k=0, top_p=1.0), 30).flatten().tolist()) == {1}
    flat = _draw(logits, SamplingConfig(temperature=1e30, top_k=0, top_p=1.0, repetition_penalty=1.0), 600)
    counts = torch.bincount(flat.flatten(), minlength=4)
    assert counts[3] == 0 and (counts[:3] > 150).all()


def test_extreme_repetition_penalties_keep_a_token():
    logits = torch.tensor([[5.0, -3e38, 2.0]])
    context = torch.tensor([[0, 1, 2]])
    for penalty in (1e-30, 1e30):
        ids = _draw(logits, SamplingConfig(repetition_penalty=penalty, top_k=0, top_p=1.0), 10, context)
        assert ((ids >= 0) & (ids < 3)).all()


def test_settings_that_would_change_the_distribution_do_not():
    """Moving the row maximum to 0 before the temperature must not change what is drawn."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])) + 1000.0
    draws = _draw(logits, SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0), 4000)
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


# --- properties ---------------------------------------------------------------------------------

VALID = st.builds(
    SamplingConfig,
    temperature=st.one_of(st.just(0.0), st.floats(min_value=0, max_value=1e300), st.sampled_from([1e-45, 1e-300])),
    top_k=st.integers(min_value=0, max_value=100),
    top_p=st.one_of(st.just(1.0), st.floats(min_value=0, max_value=1, exclude_min=True)),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(min_value=0, max_value=1e300, exclude_min=True)),
    seed=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
)
LOGIT = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False), st.just(float("-inf")),
                  st.floats(min_value=-30, max_value=30))


@st.composite
def logits_rows(draw):
    batch = draw(st.integers(1, 3))
    vocab = draw(st.integers(1, 40))
    rows = []
    for _ in range(batch):
        row = draw(st.lists(LOGIT, min_size=vocab, max_size=vocab))
        if not any(math.isfinite(v) for v in row):
            row[draw(st.integers(0, vocab - 1))] = draw(st.floats(width=32, allow_nan=False, allow_infinity=False))
        rows.append(row)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return torch.tensor(rows, dtype=torch.float32).to(dtype)


@SETTINGS
@given(cfg=VALID, logits=logits_rows(), with_context=st.booleans(), data=st.data())
def test_any_valid_settings_and_logits_give_valid_ids(cfg, logits, with_context, data):
    batch, vocab = logits.shape
    context = None
    if with_context:
        n = data.draw(st.integers(1, 8))
        context = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n),
                                                  min_size=batch, max_size=batch)))
    g = torch.Generator().manual_seed(cfg.seed or 0)
    ids = sample_next(logits, cfg, context=context, generator=g)
    assert ids.shape == (batch,) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < vocab)).all()
    if context is None:
        # a token whose logit is -inf (or NaN) is never drawn while another is finite or +inf
        chosen = logits.float().gather(1, ids[:, None])[:, 0]
        usable = ~torch.isneginf(logits.float()) & ~torch.isnan(logits.float())
        assert (~torch.isneginf(chosen) | ~usable.any(dim=1)).all()


@SETTINGS
@given(logits=logits_rows(), k=st.integers(0, 50), p=st.floats(min_value=0, max_value=1, exclude_min=True))
def test_top_k_and_top_p_never_remove_every_token(logits, k, p):
    logits = logits.float()
    assume((logits > float("-inf")).any(dim=1).all())  # half precision may have turned a row into -inf
    kept = filter_top_p(filter_top_k(logits, k), p)
    assert (kept > float("-inf")).any(dim=1).all()
    assert ((kept > float("-inf")) <= (logits > float("-inf"))).all()  # only removes, never adds


ANY = st.one_of(st.floats(), st.integers(), st.integers(min_value=-3, max_value=3), st.booleans(), st.none(),
                st.text(max_size=3), st.sampled_from([0.0, 1.0, -0.0, 1.5, math.nan, math.inf, 2**64, 10**400]))
FLAG = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
        "repetition_penalty": "--repetition-penalty", "seed": "--seed"}


def _valid(name, v):
    number = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))
    integer = isinstance(v, int) and not isinstance(v, bool)
    return {"temperature": number and v >= 0, "top_k": integer and v >= 0, "top_p": number and 0 < v <= 1,
            "repetition_penalty": number and v > 0, "seed": v is None or (integer and 0 <= v < 2**64)}[name]


@SETTINGS
@given(name=st.sampled_from(list(FLAG)), value=ANY)
def test_any_invalid_setting_is_a_config_error_naming_its_flag(name, value):
    try:
        SamplingConfig(**{name: value})
    except ConfigError as e:
        assert not _valid(name, value)
        assert str(e).startswith(FLAG[name] + " must be")
    else:
        assert _valid(name, value)
