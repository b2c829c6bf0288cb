import pytest
import torch

from babyllama.infer.generate import TextStreamer, generate_tokens
from babyllama.infer.sampling import SamplingConfig, filter_top_k, filter_top_p, apply_repetition_penalty, sample_next
from babyllama.model import Llama
from tests.conftest import tiny_model_config

GREEDY = SamplingConfig(temperature=0, repetition_penalty=1.0)


def _model():
    torch.manual_seed(3)
    return Llama(tiny_model_config(max_seq_len=96)).eval()


def test_greedy_with_and_without_kv_cache_identical():
    model = _model()
    prompt = torch.randint(0, 1024, (2, 7))
    with_cache = torch.stack(list(generate_tokens(model, prompt, 60, GREEDY, use_cache=True)), 1)
    without = torch.stack(list(generate_tokens(model, prompt, 60, GREEDY, use_cache=False)), 1)
    assert with_cache.shape == (2, 60)
    assert torch.equal(with_cache, without)


def test_sampling_with_and_without_cache_identical_for_same_seed():
    model = _model()
    prompt = torch.randint(0, 1024, (1, 5))
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, seed=7)
    a = torch.stack(list(generate_tokens(model, prompt, 40, cfg, use_cache=True)), 1)
    b = torch.stack(list(generate_tokens(model, prompt, 40, cfg, use_cache=False)), 1)
    assert torch.equal(a, b)


def test_prefill_in_two_pieces_equals_one_piece():
    """Chunked prefill: new queries must see the cache and be causal among themselves."""
    model = _model()
    tokens = torch.randint(0, 1024, (1, 30))
    full = model(tokens)
    cache = model.new_cache(1)
    first = model(tokens[:, :18], cache=cache, start_pos=0)
    second = model(tokens[:, 18:], cache=cache, start_pos=18)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-4, atol=1e-4)


def test_generation_stops_at_eos_and_context():
    model = _model()
    prompt = torch.randint(0, 1024, (1, 90))
    assert len(list(generate_tokens(model, prompt, 100, GREEDY))) == 6  # 96-token context
    first = next(generate_tokens(model, prompt[:, :5], 1, GREEDY))
    out = list(generate_tokens(model, prompt[:, :5], 50, GREEDY, eos_id=int(first)))
    assert len(out) == 1


def test_sampling_really_samples():
    """The original took the argmax after top-p; a real sampler draws different tokens."""
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, cfg, generator=g) for _ in range(2000)])
    counts = torch.bincount(draws.flatten(), minlength=10).float() / 2000
    expected = logits.softmax(-1)[0]
    assert (counts > 0).all()  # every token is drawn sometimes
    assert torch.allclose(counts, expected, atol=0.03)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.1)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 2.0, -1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 2.0, -1.0]]


def test_streamer_never_prints_half_a_character(tokenizer):
    text = "表情😀和生僻字𠀾。"
    streamer = TextStreamer(tokenizer)
    pieces = [streamer.push(i) for i in tokenizer.encode(text)] + [streamer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("tie,compiled", [(True, True), (False, True), (True, False)])
def test_decoding_layout_gives_the_same_logits_and_tokens(tie, compiled):
    """prepare_for_decoding (compiled row dot products, or transposed weights) against the plain
    model: same logits for prefill and for one-row steps, same greedy tokens."""
    import copy

    from babyllama.infer.decode import DecodeLinear, prepare_for_decoding
    from babyllama.model import Llama

    torch.manual_seed(0)
    plain = Llama(tiny_model_config(tie_embeddings=tie)).eval()
    fast = prepare_for_decoding(copy.deepcopy(plain), compiled=compiled)
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert any(isinstance(m, DecodeLinear) for m in fast.modules())
    tokens = torch.randint(0, 1024, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(tokens[:1, :1]), plain(tokens[:1, :1]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(tokens[:, :3]), plain(tokens[:, :3]), rtol=1e-5, atol=1e-5)  # a few rows
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    a = torch.stack(list(generate_tokens(plain, tokens[:1, :8], 20, greedy)))
    b = torch.stack(list(generate_tokens(fast, tokens[:1, :8], 20, greedy)))
    assert torch.equal(a, b)


def test_tensor_positions_in_the_cache_give_the_same_logits():
    """The fixed-shape cache path (position as a tensor, attention over the whole buffer under a
    mask) against the growing-slice path, token by token."""
    model = _model()
    tokens = torch.randint(0, 1024, (2, 12))
    a, b = model.new_cache(2, 40), model.new_cache(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:, :8], cache=a, start_pos=0),
                                   model(tokens[:, :8], cache=b, start_pos=torch.tensor(0)), rtol=1e-5, atol=1e-5)
        for pos in range(8, 12):
            step = tokens[:, pos:pos + 1]
            torch.testing.assert_close(model(step, cache=a, start_pos=pos),
                                       model(step, cache=b, start_pos=torch.tensor(pos)), rtol=1e-5, atol=1e-5)


def test_compiled_decode_step_gives_the_same_tokens():
    import copy

    from babyllama.infer.decode import DecodeSession, compiler_available, prepare_for_decoding

    if not compiler_available():
        pytest.skip("torch.compile on the CPU needs a C++ compiler")  # the eager path is tested above
    plain = _model()
    from babyllama.infer.engine import Engine

    fast = prepare_for_decoding(copy.deepcopy(plain))
    engine = Engine(fast, compile_step=True)
    prompt = [int(t) for t in torch.randint(0, 1024, (6,))]
    assert engine.generate([prompt], 40, GREEDY) == Engine(plain, compile_step=False).generate([prompt], 40, GREEDY)
    pool: dict = {}
    session = DecodeSession(fast, 1, 10, compiled=True, pool=pool)
    assert session.compiled and session.cache.max_seq_len == 96  # rounded up to 256, capped at the context
    session.close()
    assert pool[(1, 96)] is session.cache
    # a later reply reuses the cache an earlier one handed back; what that one left there is never read
    spare = engine._caches[(1, 96)]
    other = [int(t) for t in torch.randint(0, 1024, (3,))]
    c = engine.generate([other], 30, GREEDY)
    assert engine._caches[(1, 96)] is spare
    assert c == Engine(plain, compile_step=False).generate([other], 30, GREEDY)


def test_compiled_decode_step_falls_back_to_eager_with_a_warning(monkeypatch):
    import copy

    from babyllama.infer import decode

    def broken(mode):
        def step(*args):
            raise RuntimeError("no compiler")
        return step

    monkeypatch.setattr(decode, "_compiled_one_token", broken)
    plain = _model()
    from babyllama.infer.engine import Engine

    engine = Engine(decode.prepare_for_decoding(copy.deepcopy(plain), compiled=False), compile_step=True)
    prompt = [int(t) for t in torch.randint(0, 1024, (6,))]
    with pytest.warns(UserWarning, match="decoding eagerly"):
        b = engine.generate([prompt], 20, GREEDY)
    assert b == Engine(plain, compile_step=False).generate([prompt], 20, GREEDY)
    assert not engine.compile_step  # not tried again for the next reply


def test_decode_cache_length_is_bucketed():
    from babyllama.infer.decode import DecodeSession, prepare_for_decoding

    model = prepare_for_decoding(Llama(tiny_model_config(max_seq_len=1024)), compiled=False)
    assert [DecodeSession(model, 1, n, compiled=True).cache.max_seq_len for n in (10, 256, 257, 900)] == \
        [256, 256, 512, 1024]
    assert DecodeSession(model, 1, 10).cache.max_seq_len == 10  # no compiled step: exactly what is needed


def test_a_prompt_longer_than_the_context_loses_its_earliest_tokens(tokenizer, monkeypatch):
    """It used to raise ValueError. Now room for the reply is kept (max_new_tokens, at most half the
    window), the earliest tokens go with a warning, and the leading EOS document boundary stays."""
    from babyllama.infer.engine import Engine

    engine = Engine(Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval(), tokenizer)
    prompt = "我们今天讨论人民日报上的一篇新闻，它写的是农业和工业的发展。" * 6
    ids = tokenizer.encode(prompt)
    seen = []
    monkeypatch.setattr(Engine, "_texts", lambda self, prompts, *a, **k: seen.append(prompts[0]) or [""])
    with pytest.warns(UserWarning) as caught:
        engine.complete(prompt, 10)
    assert str(caught[0].message) == (f"prompt is {len(ids)} tokens; the context holds 64, 10 of them kept for the "
                                      f"reply: the earliest {len(ids) - 53} tokens were dropped")
    assert seen[-1] == [tokenizer.eos_id] + ids[-53:]
    with pytest.warns(UserWarning, match="the context holds 64, 32 of them kept for the reply"):
        engine.complete(prompt, 500)
    assert len(seen[-1]) == 32 and seen[-1][0] == tokenizer.eos_id
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="tokens were dropped"):
        text = engine.complete(prompt, 20, GREEDY, stop_at_eos=False)
    assert isinstance(text, str) and text


def test_max_new_tokens_below_one_is_a_config_error(tokenizer):
    from babyllama.config import ConfigError
    from babyllama.infer.engine import Engine

    model = _model()
    with pytest.raises(ConfigError, match="--max-new-tokens must be an integer >= 1, got 0"):
        next(generate_tokens(model, torch.zeros(1, 3, dtype=torch.long), 0, GREEDY))
    with pytest.raises(ConfigError, match="--max-new-tokens must be an integer >= 1, got -5"):
        Engine(model, tokenizer).complete("你好", -5, GREEDY)
    with pytest.raises(ConfigError, match="prompt has 96 tokens; the model's context is 96"):
        next(generate_tokens(model, torch.zeros(1, 96, dtype=torch.long), 5, GREEDY))


@pytest.mark.parametrize("kind", ["dynamic-ntk", "clex"])
def test_dynamic_rope_decodes_past_the_trained_length_with_and_without_cache_alike(kind):
    """Through the Engine, prepared for decoding, rows of unequal length (left-padded cache): the
    frequencies change at every step past the trained length, and each row still gets the tokens it
    gets alone and without any cache (the logits themselves: tests/model/test_rope_scaling.py)."""
    from babyllama.infer.decode import prepare_for_decoding
    from babyllama.infer.engine import Engine

    torch.manual_seed(5)
    model = Llama(tiny_model_config(max_seq_len=32).with_rope_scaling(kind, 4.0)).eval()
    if kind == "clex":
        torch.nn.init.normal_(model.rope.clex.down.weight, std=0.5)
    assert model.config.max_seq_len == 128 and model.rope.dynamic
    prompts = [torch.randint(0, 1024, (20,)).tolist(), torch.randint(0, 1024, (9,)).tolist()]
    engine = Engine(prepare_for_decoding(model), compile_step=True)  # refused: its tables follow the length
    assert not engine.compile_step
    together = engine.generate(prompts, 60, GREEDY)
    for prompt, tokens in zip(prompts, together):
        assert tokens == engine.generate([prompt], 60, GREEDY)[0]
        uncached = torch.stack(list(generate_tokens(model, torch.tensor([prompt]), 60, GREEDY, use_cache=False)), 1)
        assert tokens == uncached[0].tolist()
