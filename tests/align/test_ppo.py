"""PPO: GAE, the clipped policy and value losses and the batch's rewards against hand computations;
the value head (records in training only, loads back); `babyllama rl --algo ppo` end to end: a rule
reward rises while the KL stays small, and a run paused inside a reused rollout resumes exactly."""

import json
import math

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.adapters.heads import ValueHead, value_tap
from babyllama.align.ppo import gae, ppo_loss, value_batch
from babyllama.cli import main
from babyllama.config import IGNORE_INDEX
from babyllama.model import Llama
from babyllama.transforms import applied, apply_transforms
from tests.conftest import tiny_model_config


def test_gae_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.2, 0.4, 9.0], [0.1, -0.1, 9.0, 9.0]])  # 9: padding, never read
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for row, n in ((0, 3), (1, 2)):
        r, v = rewards[row, :n].tolist(), values[row, :n].tolist() + [0.0]
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            delta = r[t] + gamma * v[t + 1] - v[t]
            running = delta + gamma * lam * running
            expected[t] = running
        assert adv[row, :n].tolist() == pytest.approx(expected, rel=1e-6)
        assert ret[row, :n].tolist() == pytest.approx([a + b for a, b in zip(expected, v)], rel=1e-6)
        assert adv[row, n:].abs().sum() == 0 and ret[row, n:].abs().sum() == 0
    # lambda 1, gamma 1: the advantage is the reward-to-go minus the value
    adv, _ = gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    assert adv[0, 0].item() == pytest.approx(0.1 - 0.2 + 1.0 - 0.3)


def test_ppo_loss_by_hand():
    torch.manual_seed(0)
    logps, old = torch.randn(2, 4) * 0.3 - 2, torch.randn(2, 4) * 0.3 - 2
    values, old_values, returns = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    adv = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    clip, value_clip, vf_coef = 0.2, 0.3, 0.5
    per_seq, metrics = ppo_loss(logps, old, values, old_values, adv, returns, mask, clip, value_clip, vf_coef)
    value_losses = []
    for i in range(2):
        terms, vterms = [], []
        for t in range(4):
            if not mask[i, t]:
                continue
            ratio, a = math.exp(logps[i, t] - old[i, t]), float(adv[i, t])
            policy = max(-a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip))
            v, v0, r = float(values[i, t]), float(old_values[i, t]), float(returns[i, t])
            v_clipped = v0 + min(max(v - v0, -value_clip), value_clip)
            value = 0.5 * max((v - r) ** 2, (v_clipped - r) ** 2)
            terms.append(policy + vf_coef * value)
            vterms.append(value)
        assert per_seq[i].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
        value_losses.append(sum(vterms) / len(vterms))
    assert metrics["value_loss"].item() == pytest.approx(sum(value_losses), rel=1e-5)
    assert metrics["clip_fraction"].item() > 0  # these ratios do get clipped
    # ratio 1 and values at the returns: the loss is -A, its gradient A grad log pi
    same, _ = ppo_loss(old, old, returns, returns, adv, returns, mask, clip, value_clip, vf_coef)
    assert same[0].item() == pytest.approx(-(adv[0, :3].sum() / 3).item(), rel=1e-5)


def test_value_batch_rewards_and_advantages_by_hand():
    targets = torch.tensor([[IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX]])
    old, ref = -torch.rand(2, 5) - 1, -torch.rand(2, 5) - 1
    old_values, rewards = torch.randn(2, 5), torch.tensor([1.0, -2.0])
    beta, gamma, lam = 0.1, 0.9, 0.8
    batch = value_batch(None, torch.zeros(2, 5, dtype=torch.long), targets, old, ref, rewards,
                        old_values=old_values, beta=beta, gamma=gamma, lam=lam)
    _, _, _, _, _, values, advantages, returns = batch
    raw = []
    for row, span in ((0, range(1, 4)), (1, range(2, 4))):
        span = list(span)
        r = [-beta * float(old[row, t] - ref[row, t]) for t in span]
        r[-1] += float(rewards[row])  # the reward at the last completion token
        v = [float(old_values[row, t]) for t in span] + [0.0]
        running, expected = 0.0, [0.0] * len(span)
        for k in reversed(range(len(span))):
            running = r[k] + gamma * v[k + 1] - v[k] + gamma * lam * running
            expected[k] = running
        assert returns[row, span].tolist() == pytest.approx([a + b for a, b in zip(expected, v)], rel=1e-5)
        raw += expected
    raw = torch.tensor(raw)
    whitened = (raw - raw.mean()) / raw.std()
    got = torch.cat([advantages[0, 1:4], advantages[1, 2:4]])
    torch.testing.assert_close(got, whitened, rtol=1e-4, atol=1e-5)
    mask = targets != IGNORE_INDEX
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all() and (values[~mask] == 0).all()


def test_value_head_records_in_training_only_and_loads_back(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=32)
    model = Llama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    before = model(tokens).detach()
    apply_transforms(model, [ValueHead()])
    tap = value_tap(model)
    torch.nn.init.normal_(tap.linear.weight)  # as if trained
    model.train()
    targets = torch.randint(0, cfg.vocab_size, (2, 9))
    losses = model(tokens, targets, reduction="none")
    values = tap.take()
    assert values.shape == (2, 9) and losses.shape == (2, 9)
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, out: hidden.setdefault("h", out))
    model(tokens)
    torch.testing.assert_close(tap.take(), tap.linear(hidden["h"]).squeeze(-1))
    with pytest.raises(RuntimeError, match="no values recorded"):
        tap.take()
    model.eval()
    torch.testing.assert_close(model(tokens), before)  # the policy's outputs are untouched
    assert tap.values is None  # generation records nothing
    ckpt_io.save_checkpoint(tmp_path, 1, model, cfg, transforms=applied(model))
    loaded, _ = ckpt_io.load_model(tmp_path)
    torch.testing.assert_close(loaded(tokens), before)
    torch.testing.assert_close(value_tap(loaded).linear.weight, tap.linear.weight)


def _ppo(root, out, *extra):
    return main(["rl", "--algo", "ppo", "--ckpt", str(root / "sft"), "--prompts", str(root / "prompts.txt"),
                 "--out", str(out), "--reward-fn", f"{root / 'reward.py'}:good", "--device", "cpu",
                 "--group-size", "4", "--max-new-tokens", "12", "--batch-size", "2", "--lr", "1e-3",
                 "--set", "train.log_interval=1", "--set", "train.warmup_steps=1", *extra])


def test_ppo_raises_a_rule_reward_with_a_bounded_kl(sft_run, tmp_path):
    assert _ppo(sft_run, tmp_path / "ppo", "--max-steps", "16") == 0
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").open() if '"reward"' in line]
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.8 and last > first + 0.15, rewards
    kl = [r["kl"] for r in records]
    assert kl[0] == pytest.approx(0, abs=1e-3) and sum(kl[-4:]) / 4 < 1.5 and all(math.isfinite(x) for x in kl)
    assert all(math.isfinite(r["value_loss"]) for r in records)
    meta = json.loads((tmp_path / "ppo" / "run.json").read_text())
    assert meta["stage"] == "ppo" and meta["ppo"]["lam"] == 0.95
    # the trained policy loads and generates like any checkpoint
    assert main(["generate", "--ckpt", str(tmp_path / "ppo"), "--prompt", "第3个问题是什么？", "--chat",
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0


def test_ppo_resumes_exactly_within_a_reused_rollout(sft_run, tmp_path):
    # --epochs 2: the pause at step 3 falls between the two steps of a rollout, which must be kept
    args = ("--max-steps", "4", "--epochs", "2", "--set", "train.ckpt_interval=3")
    assert _ppo(sft_run, tmp_path / "whole", *args) == 0
    assert _ppo(sft_run, tmp_path / "halves", *args, "--stop-at-step", "3") == 0
    assert _ppo(sft_run, tmp_path / "halves", "--resume", "--epochs", "2") == 0
    a = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "whole"))
    b = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "halves"))
    assert any(k.startswith("value_head.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    clip = [[json.loads(line).get("clip_fraction") for line in (tmp_path / run / "metrics.jsonl").open()]
            for run in ("whole", "halves")]
    assert [x for x in clip[0] if x is not None] == [x for x in clip[1] if x is not None]


def test_ppo_refuses_lora(sft_run, tmp_path, capsys):
    assert _ppo(sft_run, tmp_path / "x", "--lora") != 0
    assert "full fine-tuning only" in capsys.readouterr().err
