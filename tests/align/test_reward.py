"""`babyllama reward train`: a tiny model with a scalar head learns a synthetic preference to more
than 90% held-out pairwise accuracy, its checkpoint loads as a scorer, and a paused run resumes exactly."""

import json
import random

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.align.reward import collate_scored, sequence_rewards
from babyllama.cli import main
from babyllama.data.preference import build_pairs
from babyllama.model import Llama
from babyllama.tokenizer.chat import ChatTemplate
from tests.conftest import tiny_model_config

WORDS = ["今天", "天气", "我们", "一起", "学习", "中国", "经济", "发展", "人民", "生活", "城市", "农村", "工作", "时间"]


def _pairs(path, n, seed):
    """Replies of the same random words; the chosen one ends politely (好的，谢谢), the rejected rudely."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = "".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        rows.append({"question": f"{rng.choice(WORDS)}{i}怎么样？", "response_chosen": f"{words}，好的，谢谢。",
                     "response_rejected": f"{words}，不知道，别问。"})
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("reward")
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    ckpt_io.save_checkpoint(root / "base", 0, Llama(cfg), cfg)
    tokenizer.save(root / "base" / "tokenizer")
    return root / "base", _pairs(root / "pairs.jsonl", 400, seed=1), _pairs(root / "heldout.jsonl", 100, seed=2)


def _train(base, pairs, out, *extra):
    return main(["reward", "train", "--ckpt", str(base), "--data", str(pairs), "--out", str(out), "--device", "cpu",
                 "--batch-size", "16", "--lr", "1e-3", "--set", "train.warmup_steps=5", "--set", "train.eval_interval=20",
                 "--set", "train.eval_batches=4", "--set", "train.ckpt_interval=20", *extra])


def test_a_reward_model_learns_a_synthetic_preference(base, tokenizer, tmp_path):
    ckpt, pairs, heldout = base
    assert _train(ckpt, pairs, tmp_path / "rm", "--max-steps", "60") == 0
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").open()]
    val = [r for r in records if "val_reward_accuracy" in r]
    assert val[0]["val_reward_accuracy"] < 0.8  # the untrained head: about chance
    assert val[-1]["val_reward_accuracy"] > 0.9 and val[-1]["val_loss"] < val[0]["val_loss"]
    # the checkpoint loads as a scorer and ranks pairs it never saw
    model, _ = ckpt_io.load_model(tmp_path / "rm")
    assert model.output.weight.shape == (1, model.config.dim) and not model.config.tie_embeddings
    samples, _, _ = build_pairs([str(heldout)], ChatTemplate(tokenizer), 64, val_fraction=0.0)
    tokens, last = collate_scored(samples, tokenizer.pad_id)
    with torch.no_grad():
        rewards = sequence_rewards(model, tokens, last)
        assert model(tokens[:, 0]).shape == (len(samples), tokens.shape[-1], 1)
    assert (rewards[:, 0] > rewards[:, 1]).float().mean() > 0.9
    # a reward is read at the reply's closing marker, not at padding
    template = ChatTemplate(tokenizer)
    assert all(tokens[i, s, last[i, s]] == template.end_id for i in range(len(samples)) for s in (0, 1))


def test_reward_training_resumes_exactly(base, tmp_path):
    ckpt, pairs, _ = base
    args = ("--max-steps", "8", "--set", "train.ckpt_interval=4")
    assert _train(ckpt, pairs, tmp_path / "whole", *args) == 0
    assert _train(ckpt, pairs, tmp_path / "halves", *args, "--stop-at-step", "4") == 0
    assert main(["reward", "train", "--ckpt", str(ckpt), "--data", str(pairs), "--out", str(tmp_path / "halves"),
                 "--resume", "--device", "cpu"]) == 0
    a = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "whole"))
    b = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "halves"))
    assert set(a) == set(b) and a["output.weight"].shape[0] == 1
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_reward_model_run_serves_as_an_rl_reward(tokenizer, tmp_path):
    from babyllama.adapters.heads import ScalarHead
    from babyllama.align.rewards import ModelReward
    from babyllama.config import ConfigError
    from babyllama.transforms import applied, apply_transforms

    torch.manual_seed(3)
    model = apply_transforms(Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)), [ScalarHead()])
    ckpt_io.save_checkpoint(tmp_path / "rm", 0, model, model.config, transforms=applied(model))
    reward = ModelReward(str(tmp_path / "rm"))
    seqs = [[5, 6, 7, 8], [9, 10]]
    got = reward.score(seqs, tokenizer.pad_id)
    with torch.no_grad():
        want = [model.eval()(torch.tensor([s]))[0, -1, 0].item() for s in seqs]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    plain = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64))
    ckpt_io.save_checkpoint(tmp_path / "lm", 0, plain, plain.config)
    with pytest.raises(ConfigError, match="is not a reward model"):
        ModelReward(str(tmp_path / "lm"))
