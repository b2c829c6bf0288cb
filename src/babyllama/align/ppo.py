"""PPO for language models (Schulman et al. 2017; as in InstructGPT, Ouyang et al. 2022), as an
objective of the one training loop, on the rollouts GRPO uses (align/rl.py's `Rollouts`).

The value model is a head on the policy's own trunk (adapters/heads.py `ValueHead`: a linear map of
the final normed state at every position, zero at the start), so one forward pass gives both the
token log-probs and the values. At the position that predicts completion token t, the value
estimates the return of the state before t.

A rollout becomes a batch (`value_batch`): with the policy as it sampled (pi_old, and its values
V_old) and the frozen reference, each completion token earns

    r_t = -beta (log pi_old(t) - log ref(t))      (+ the completion's reward at its last token)

and generalised advantage estimation (`gae`, gamma and lambda) gives advantages A_t and returns
R_t = A_t + V_old_t; the advantages are whitened over the batch's completion tokens. The loss per
completion token, with ratio = pi / pi_old and the value clip c_v around V_old,

    max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + vf_coef 0.5 max((V - R)^2, (V_clipped - R)^2)

is averaged over each completion's tokens, then over completions (as GRPO's). Each rollout serves
`--epochs` optimisation steps (1: the ratio is 1 and nothing is clipped).

Generalised advantage estimation over a completion's tokens t = 0 .. T-1, with per-token rewards r_t
and values V_t:

    delta_t = r_t + gamma V_{t+1} - V_t        (V_T = 0: nothing follows the last token)
    A_t     = delta_t + gamma lambda A_{t+1}   (A_T = 0)
    returns = A + V                            (the value head's regression targets)
"""

from __future__ import annotations

import torch

from babyllama.config import IGNORE_INDEX, check_float
from babyllama.train.objectives import Batch, Objective


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (rows, width), zero outside `mask`. Each row's completion is one
    contiguous run of mask 1 (prompt positions before it and padding after it are 0)."""
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


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (0 elsewhere)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float, value_clip: float,
             vf_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-completion losses, summed metrics) from per-token tensors (rows, width)."""
    ratio = torch.exp(logps - old_logps)
    policy = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    lengths = mask.sum(-1).clamp(min=1)

    def per_seq(x):
        return (x * mask).sum(-1) / lengths

    clipped = ((ratio < 1 - clip) | (ratio > 1 + clip)).float()
    return per_seq(policy + vf_coef * value), {"value_loss": per_seq(value.detach()).sum(),
                                               "clip_fraction": per_seq(clipped).sum()}


class ClippedPolicyValue(Objective):
    """PPO over rollouts (tokens, targets, old_logps, ref_logps, rewards, old_values, advantages,
    returns) from `value_batch`, on a model with a `ValueHead`: the count is the number of completions."""

    name = "ppo"

    def __init__(self, clip: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1):
        check_float("--clip", clip, 0, 1, low_open=True, high_open=True)
        check_float("--value-clip", value_clip, 0, low_open=True)
        check_float("--vf-coef", vf_coef, 0)
        self.clip, self.value_clip, self.vf_coef = clip, value_clip, vf_coef

    def count(self, batch: Batch) -> int:
        if len(batch) != 8:
            raise ValueError("the PPO objective trains on rollouts (tokens, targets, old_logps, ref_logps, rewards, "
                             "old_values, advantages, returns)")
        return batch[0].shape[0]

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from babyllama.adapters.heads import value_tap

        tokens, targets, old_logps, ref_logps, rewards, old_values, advantages, returns = batch
        mask = (targets != IGNORE_INDEX).float()
        logps = -model(tokens, targets, reduction="none")  # the same call leaves the values in the tap
        values = value_tap(model).take()
        per_seq, metrics = ppo_loss(logps, old_logps, values, old_values, advantages, returns, mask, self.clip,
                                    self.value_clip, self.vf_coef)
        lengths = mask.sum(-1).clamp(min=1)
        log_ref_ratio = (ref_logps - logps.detach()) * mask
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3, as GRPO logs it
        metrics.update(reward=rewards.sum(), completion_len=mask.sum(), kl=((kl * mask).sum(-1) / lengths).sum(),
                       entropy=((-logps.detach() * mask).sum(-1) / lengths).sum())
        return per_seq.sum(), metrics


def value_batch(policy, tokens, targets, old_logps, ref_logps, rewards, *, old_values, beta: float,
                gamma: float, lam: float) -> tuple:
    """A rollout as PPO's batch (see the module doc): KL-penalised per-token rewards, GAE, whitened
    advantages. `old_values`: the value head's estimates from the same forward as `old_logps`."""
    mask = (targets != IGNORE_INDEX).float()
    token_rewards = -beta * (old_logps - ref_logps) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)  # each completion's last token
    token_rewards = token_rewards + last.float() * rewards[:, None]
    advantages, returns = gae(token_rewards, old_values, mask, gamma, lam)
    return (tokens, targets, old_logps, ref_logps, rewards, old_values * mask, whiten(advantages, mask), returns)
