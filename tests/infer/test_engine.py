"""The Engine: one prompt gives the tokens of the plain generation loop; each row of a batch of
unequal prompts gives the tokens it gets alone; rows stop, sample and stream on their own."""

import copy

import pytest
import torch

from babyllama.config import ConfigError
from babyllama.infer.decode import DecodeLinear, _pack, compiler_available, prepare_for_decoding
from babyllama.infer.engine import Engine
from babyllama.infer.sampling import SamplingConfig, sample_next
from babyllama.model import Llama
from tests.conftest import tiny_model_config

GREEDY = SamplingConfig(temperature=0, repetition_penalty=1.0)
SAMPLED = SamplingConfig(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=11)


def _model(**kw):
    """A random model with larger weights than at init: its greedy tokens vary (a fresh one repeats)."""
    torch.manual_seed(5)
    model = Llama(tiny_model_config(max_seq_len=128, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


@torch.no_grad()
def reference(model, prompt: list[int], max_new: int, sampling: SamplingConfig) -> list[int]:
    """The generation loop written plainly, as it was before the Engine: the whole prefix through
    the plain model each step, the repetition penalty over the context, one generator per prompt."""
    tokens = torch.tensor([prompt])
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    out = []
    for _ in range(min(max_new, model.config.max_seq_len - len(prompt))):
        logits = model(tokens, last_only=True)[:, -1]
        next_id = sample_next(logits, sampling, context=tokens, generator=generator)
        out.append(int(next_id))
        tokens = torch.cat([tokens, next_id[:, None]], dim=1)
    return out


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "decode-layout"])
def test_one_prompt_gives_the_tokens_of_the_plain_loop(sampling, fast):
    model = _model()
    engine = Engine(prepare_for_decoding(copy.deepcopy(model)) if fast else model,
                    compile_step=fast and compiler_available())
    prompt = _prompts([9])[0]
    expected = reference(model, prompt, 40, sampling)
    assert engine.generate([prompt], 40, sampling) == [expected]
    assert len(set(expected)) > 5  # a test that a constant stream could not pass


@pytest.mark.parametrize("tie", [True, False])
def test_each_row_of_a_ragged_batch_gets_the_tokens_it_gets_alone(tie):
    model = _model(tie_embeddings=tie)
    engine = Engine(model)
    prompts = _prompts([3, 17, 1, 9, 30])
    batch = engine.generate(prompts, 25, GREEDY)
    assert [len(r) for r in batch] == [25] * 5
    assert batch == [engine.generate([p], 25, GREEDY)[0] for p in prompts]
    assert len({tuple(r) for r in batch}) > 1  # the rows really differ


def test_a_ragged_batch_on_the_compiled_fast_path():
    if not compiler_available():
        pytest.skip("torch.compile on the CPU needs a C++ compiler")  # the eager path is tested above
    model = _model()
    engine = Engine(prepare_for_decoding(copy.deepcopy(model)), compile_step=True)
    prompts = _prompts([4, 11, 7], seed=1)
    assert engine.generate(prompts, 20, GREEDY) == [reference(model, p, 20, GREEDY) for p in prompts]
    if _pack(torch.zeros(4, 4)) is not None:  # torch with oneDNN: batches ran on its reordered weights
        assert all(m.packed is not None for m in engine.model.modules() if isinstance(m, DecodeLinear))
    assert engine.generate(prompts[:1], 20, GREEDY)[0] == reference(model, prompts[0], 20, GREEDY)


def test_a_ragged_batch_on_the_eager_decoding_layout():
    model = _model()
    engine = Engine(prepare_for_decoding(copy.deepcopy(model), compiled=False), compile_step=False)
    prompts = _prompts([6, 2, 13], seed=4)
    assert engine.generate(prompts, 20, GREEDY) == [reference(model, p, 20, GREEDY) for p in prompts]


def test_rows_have_their_own_sampling_stops_and_budgets():
    model = _model()
    engine = Engine(model)
    prompts = _prompts([5, 12, 8], seed=2)
    alone = [reference(model, p, 30, s) for p, s in zip(prompts, [GREEDY, SAMPLED, GREEDY])]
    stop = alone[2][6]  # row 2 stops at its 7th token (or earlier, if that id came before)
    first_stop = alone[2].index(stop)
    steps = list(engine.stream(prompts, [30, 30, 30], [GREEDY, SAMPLED, GREEDY], [[], [], [stop]]))
    rows = [[s[i] for s in steps] for i in range(3)]
    assert rows[0] == alone[0] and rows[1] == alone[1]
    assert rows[2][:first_stop + 1] == alone[2][:first_stop + 1]  # the stop id itself is streamed
    assert set(rows[2][first_stop + 1:]) == {None}  # then the row is finished
    budgets = engine.generate(prompts, [3, 10, 1], GREEDY)
    assert [len(r) for r in budgets] == [3, 10, 1]
    assert budgets[1] == reference(model, prompts[1], 10, GREEDY)


def test_a_batch_stops_when_every_row_has_and_shares_the_context():
    model = _model()
    engine = Engine(model)
    prompts = _prompts([120, 4], seed=3)
    out = engine.generate(prompts, 50, GREEDY)
    assert [len(r) for r in out] == [8, 8]  # the longest prompt leaves 8 of 128 positions
    with pytest.raises(ConfigError, match="a prompt is empty"):
        engine.generate([[1, 2], []], 5)
    with pytest.raises(ConfigError, match="2 values for 3 prompts"):
        engine.generate(_prompts([2, 2, 2]), [5, 5])


def test_text_batches_equal_their_single_calls(tokenizer):
    from babyllama.tokenizer.chat import Message

    torch.manual_seed(1)
    model = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)).eval()
    engine = Engine(model, tokenizer)
    texts = ["人民日报", "今天的新闻说农业和工业都在发展"]
    streamed: dict[int, list[str]] = {0: [], 1: []}
    batch = engine.complete_batch(texts, 15, GREEDY, on_text=lambda row, t: streamed[row].append(t))
    assert batch == [engine.complete(t, 15, GREEDY) for t in texts]
    assert ["".join(streamed[i]) for i in range(2)] == batch
    chats = [[Message("user", "你好")], [Message("system", "简短回答"), Message("user", "农业怎么样？")]]
    assert engine.reply_batch(chats, 12, GREEDY) == [engine.reply(c, 12, GREEDY) for c in chats]
