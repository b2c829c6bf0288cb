"""GRPO: advantages and loss against hand computations (and TRL's normalisation), rollouts that score
the completion tokens only, and `babyllama rl --algo grpo` end to end: a rule reward rises within a
few steps while the KL to the reference stays small, and a paused run resumes exactly."""

import json
import math
from functools import partial

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.align.grpo import group_advantages, group_batch, grpo_loss
from babyllama.align.rl import Rollouts, read_prompts
from babyllama.align.rewards import load_reward_fn, no_repetition, tidy_answer
from babyllama.cli import main
from babyllama.config import ConfigError, IGNORE_INDEX
from babyllama.corpus.readers import DataError
from babyllama.model import Llama
from babyllama.tokenizer.chat import ChatTemplate
from tests.conftest import tiny_model_config


def test_group_advantages_by_hand_and_as_trl_normalises():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 3.0])
    adv = group_advantages(rewards, 4)
    for g in range(2):
        r = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # Bessel's correction
        assert adv[4 * g:4 * g + 4].tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in r], rel=1e-6)
    trl_utils = pytest.importorskip("trl.trainer.utils")
    grouped = rewards.view(-1, 4)
    theirs = (grouped - grouped.mean(1, keepdim=True)) / (trl_utils.nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(adv, theirs.view(-1), rtol=1e-6, atol=1e-6)
    assert group_advantages(torch.ones(4), 4).abs().max() == 0  # a group that agrees teaches nothing


def test_grpo_loss_by_hand():
    torch.manual_seed(0)
    logps, old, ref = torch.randn(3, 5) * 0.3 - 2, torch.randn(3, 5) * 0.3 - 2, torch.randn(3, 5) * 0.3 - 2
    adv = torch.tensor([1.0, -0.5, 0.2])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float32)
    beta, clip = 0.04, 0.2
    per_seq, metrics = grpo_loss(logps, old, ref, adv, mask, beta, clip)
    for i in range(3):
        terms, kls, clipped = [], [], 0
        for t in range(5):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t] - old[i, t])
            a = float(adv[i])
            surrogate = -min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            d = float(ref[i, t] - logps[i, t])
            kl = math.exp(d) - d - 1
            terms.append(surrogate + beta * kl)
            kls.append(kl)
            clipped += ratio < 1 - clip or ratio > 1 + clip
        assert per_seq[i].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert metrics["clip_fraction"].item() > 0  # these ratios do get clipped


def test_prompts_files_and_reward_functions(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("你好\n\n今天天气？\n", encoding="utf-8")
    assert [p[-1].content for p in read_prompts(str(txt))] == ["你好", "今天天气？"]
    js = tmp_path / "p.jsonl"
    js.write_text('{"prompt": "一"}\n{"messages": [{"role": "user", "content": "二"}, {"role": "assistant", '
                  '"content": "x"}]}\n{"instruction": "三", "input": "四"}\n', encoding="utf-8")
    assert [p[-1].content for p in read_prompts(str(js))] == ["一", "二", "三\n四"]
    js.write_text('{"prompt": "一"}\n{"text": "二"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="p.jsonl: line 2: missing field 'prompt'"):
        read_prompts(str(js))
    assert no_repetition("", "好好好好好好好好") == pytest.approx(0.2)  # 4 of its 5 four-grams repeat
    assert no_repetition("", "今天天气很好。") == 1
    assert tidy_answer("", "今天天气很好，我们去公园散步吧。") == 1
    assert tidy_answer("", "今天天气很好。") == pytest.approx(2 / 3)  # too short for the house format
    fn = tmp_path / "r.py"
    fn.write_text("def score(prompt, completion):\n    return float('好' in completion)\n", encoding="utf-8")
    assert load_reward_fn(f"{fn}:score")("", "很好") == 1.0
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_reward_fn(f"{fn}:nope")


def test_rollouts_score_the_completion_tokens_only(tokenizer):
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64))
    from babyllama.tokenizer.chat import Message

    prompts = [[Message("user", "你好")], [Message("user", "今天天气怎么样？")]]
    source = Rollouts(model, model, tokenizer, prompts, lambda p, c: float(len(c)),
                      partial(group_batch, group_size=3), group_size=3, prompts_per_batch=2, max_new_tokens=6, seed=1)
    tokens, targets, old, ref, rewards, adv = source.next_batch()
    assert tokens.shape[0] == 6 and adv.shape == rewards.shape == (6,)
    template = ChatTemplate(tokenizer)
    for row in range(6):
        prompt = template.prompt_ids(prompts[row // 3])
        scored = (targets[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored[0] == len(prompt) - 1  # the first completion token is predicted from the prompt's end
        assert scored == list(range(scored[0], scored[0] + len(scored)))
        assert (ref[row][targets[row] == IGNORE_INDEX] == 0).all() and (ref[row][scored] < 0).all()
        assert torch.equal(old[row], ref[row])  # the policy is its own reference here
    assert model.training  # generation left the policy as it found it


def _rl(root, out, *extra):
    return main(["rl", "--algo", "grpo", "--ckpt", str(root / "sft"), "--prompts", str(root / "prompts.txt"),
                 "--out", str(out), "--reward-fn", f"{root / 'reward.py'}:good", "--device", "cpu",
                 "--group-size", "4", "--max-new-tokens", "12", "--batch-size", "2", "--lr", "1e-3",
                 "--set", "train.log_interval=1", "--set", "train.warmup_steps=1", *extra])


def test_grpo_raises_a_rule_reward_with_a_bounded_kl(sft_run, tmp_path):
    assert _rl(sft_run, tmp_path / "rl", "--max-steps", "16") == 0
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").open() if '"reward"' in line]
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.8 and last > first + 0.15, rewards
    # the per-token KL estimate to the reference: about ln 2 over the one token where 好 and 坏 part
    kl = [r["kl"] for r in records]
    assert kl[0] == pytest.approx(0, abs=1e-3) and sum(kl[-4:]) / 4 < 1.5 and all(math.isfinite(x) for x in kl)
    assert all(r["completion_len"] > 0 for r in records)


def test_grpo_resumes_exactly(sft_run, tmp_path):
    args = ("--max-steps", "4", "--set", "train.ckpt_interval=2")
    assert _rl(sft_run, tmp_path / "whole", *args) == 0
    assert _rl(sft_run, tmp_path / "halves", *args, "--stop-at-step", "2") == 0
    assert _rl(sft_run, tmp_path / "halves", "--resume") == 0
    a = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "whole"))
    b = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "halves"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rewards = [[json.loads(line).get("reward") for line in (tmp_path / run / "metrics.jsonl").open()]
               for run in ("whole", "halves")]
    assert [x for x in rewards[0] if x is not None] == [x for x in rewards[1] if x is not None]
