"""Perplexity: windows score every token once; the numbers match full logits and transformers;
a memorised text scores near 1, a fresh model near the vocabulary size; bits per character are
the loss in bits over the characters; lengths past the trained context work."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from babyllama.cli import main
from babyllama.config import ConfigError
from babyllama.eval.perplexity import PerplexityConfig, perplexity, score_stream, windows
from babyllama.model import Llama
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("n,length,stride", [(100, 16, 8), (100, 16, 16), (17, 16, 5), (5, 16, 3), (64, 10, 1)])
def test_windows_score_every_target_once_with_at_most_length_context(n, length, stride):
    scored = []
    for begin, end, first in windows(n, length, stride):
        assert end - begin <= length and begin < first <= end
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def _stream(n, vocab=1024, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).numpy()


@torch.no_grad()
def _full_logits_nll(model, stream, length):
    """Non-overlapping chunks through the plain logits: an independent plain perplexity."""
    total, count = 0.0, 0
    for begin in range(0, len(stream) - 1, length):
        end = min(begin + length, len(stream) - 1)
        x = torch.tensor(stream[begin:end])[None]
        y = torch.tensor(stream[begin + 1:end + 1])
        total += float(F.cross_entropy(model(x)[0].double(), y, reduction="sum"))
        count += len(y)
    return total, count


def test_stride_equal_to_the_window_is_plain_chunked_perplexity():
    model = Llama(tiny_model_config()).eval()
    stream = _stream(200)
    nats, count = score_stream(model, stream, 32, 32, batch_size=3)
    ref, ref_count = _full_logits_nll(model, stream, 32)
    assert count == ref_count == 199
    assert nats == pytest.approx(ref, rel=1e-5)
    # a text shorter than the window: every stride gives the one whole-text forward
    short = stream[:20]
    whole, _ = _full_logits_nll(model, short, 64)
    for stride in (1, 5, 64):
        assert score_stream(model, short, 64, stride)[0] == pytest.approx(whole, rel=1e-5)


def test_sliding_windows_match_transformers_on_the_exported_model():
    from babyllama.export.hf import to_hf_model

    model = Llama(tiny_model_config(tie_embeddings=False)).eval()
    hf = to_hf_model(model)
    stream = _stream(150, seed=2)
    nats, count = score_stream(model, stream, 40, 13, batch_size=4)
    ref = 0.0
    with torch.no_grad():
        for begin, end, first in windows(len(stream), 40, 13):
            logits = hf(torch.tensor(stream[begin:end])[None]).logits[0].double()
            nll = F.cross_entropy(logits, torch.tensor(stream[begin + 1:end + 1]), reduction="none")
            ref += float(nll[first - begin - 1:].sum())
    assert nats == pytest.approx(ref, rel=1e-4)


def test_a_memorised_text_scores_near_one_and_a_fresh_model_near_the_vocabulary():
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=256, max_seq_len=64))
    fresh = score_stream(model.eval(), _stream(64, 256, seed=3), 32, 32)
    assert 0.8 * 256 < math.exp(fresh[0] / fresh[1]) < 1.25 * 256
    text = _stream(33, 256, seed=4)
    x, y = torch.tensor(text[:-1])[None], torch.tensor(text[1:])[None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(x, y) / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
    nats, count = score_stream(model.eval(), text, 32, 32)
    assert math.exp(nats / count) < 1.2


def test_the_command_scores_text_at_several_lengths_and_writes_the_run_eval(tiny_run, tokenizer, corpus_dir, capsys):
    run, model = tiny_run
    text = corpus_dir / "reviews.txt"
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", str(text), "--lengths", "32,64,128",
                 "--max-tokens", "3000"]) == 0
    out = capsys.readouterr().out
    assert "128*" in out and "past the trained context" in out
    result = json.loads((run / "eval" / "ppl-reviews.json").read_text(encoding="utf-8"))
    rows = {r["length"]: r for r in result["results"]}
    assert set(rows) == {32, 64, 128} and rows[128]["beyond_trained"] and not rows[64]["beyond_trained"]
    assert all(r["tokens"] == result["stream_tokens"] - 1 for r in rows.values())  # the same tokens each time
    # bits per character: the summed loss in bits over the characters of the scored text
    lines = text.read_text(encoding="utf-8").splitlines()
    ids = []
    for line in lines:
        ids += tokenizer.encode(line.strip()) + [tokenizer.eos_id]
        if len(ids) >= 3000:
            break
    ids = ids[:3000]
    chars = len(tokenizer.decode(ids[1:]))
    r = rows[64]
    assert result["characters"] == chars
    assert r["bits_per_char"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / chars, rel=1e-9)
    assert r["bits_per_byte"] < r["bits_per_char"]  # Chinese: several bytes per character
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


def test_a_dataset_split_is_scored_and_mistakes_are_one_line(tiny_run, data_dir, tmp_path, capsys):
    run, _ = tiny_run
    result = perplexity(PerplexityConfig(ckpt=str(run), data=[str(data_dir)], max_tokens=500, progress=False,
                                         out=str(tmp_path / "p.json")))
    assert result["stream_tokens"] == 500 and (tmp_path / "p.json").is_file()
    with pytest.raises(ConfigError, match="--stride 40 is longer than the shortest length 32"):
        PerplexityConfig(ckpt=str(run), data=["x"], lengths=[32, 64], stride=40)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", str(empty)]) == 2
    assert "fewer than 2 tokens" in capsys.readouterr().err
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", str(empty), "--lengths", "64,x"]) == 2
    assert "--lengths must be comma-separated integers" in capsys.readouterr().err
