"""PPO's generalised advantage estimation against a hand computation."""

import pytest
import torch

from babyllama.align.ppo import gae


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
