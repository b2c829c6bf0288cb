"""PPO for language models (Schulman et al. 2017; Ouyang et al. 2022), started: the advantage
estimate. The value model, the clipped policy and value losses and `babyllama rl --algo ppo` come
next, on the same seams as GRPO (a rollout batch source and an objective).

Generalised advantage estimation over a completion's tokens t = 0 .. T-1, with per-token rewards r_t
(the KL penalty at every token, the sequence's reward added at its last one) and values V_t:

    delta_t = r_t + gamma V_{t+1} - V_t        (V_T = 0: nothing follows the last token)
    A_t     = delta_t + gamma lambda A_{t+1}   (A_T = 0)
    returns = A + V                            (the value model's regression targets)
"""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (rows, width), zero outside `mask`. Rows are completions laid
    out left-aligned with right padding (mask 1 on their tokens, then 0)."""
    rewards, values, mask = rewards.float() * mask, values.float() * mask, mask.float()
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask
