"""GRPO (group relative policy optimisation, Shao et al. 2024): RL with a group of sampled answers
per prompt and no value model, as an objective of the one training loop.

Each micro-batch is a rollout (align/rl.py's `Rollouts`, a batch source shared with PPO):
`prompts_per_batch` prompts, `group_size` completions each, sampled by the inference Engine's batched
KV-cache decoding from the current policy; every completion is rewarded (a Python function or a
reward model, align/rewards.py) and its advantage is its reward normalised within its group,

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)          (std with Bessel's correction, as TRL)

The objective (`GroupPolicy`) then minimises, per completion token t, with ratio = pi / pi_old,

    -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta (exp(ref - logp) - (ref - logp) - 1)

(the clipped surrogate and the k3 estimate of KL(pi || ref)), averaged over each completion's tokens
and then over completions: TRL's `loss_type="grpo"`. pi_old is the policy that sampled the rollout;
with one step per rollout (`--epochs 1`, TRL's default) the ratio is 1 and the gradient A grad log pi;
`--epochs K` reuses each rollout for K steps, where the clipping starts to act. The reference is
the policy as loaded, frozen. Logged: reward, KL, the clip fraction, an entropy estimate (the
mean -log p of the sampled tokens, unbiased for the entropy at temperature 1) and completion length.
"""

from __future__ import annotations

import json
import torch

from babyllama.config import IGNORE_INDEX, check_float
from babyllama.train.objectives import Batch, Objective


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps), rewards laid out group after group."""
    groups = rewards.double().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1).float()


class GroupPolicy(Objective):
    """GRPO over rollouts (tokens, targets, old_logps, ref_logps, rewards, advantages) from
    `group_batch`: the count is the number of completions."""

    name = "grpo"

    def __init__(self, beta: float = 0.04, clip: float = 0.2):
        check_float("--beta", beta, 0)
        check_float("--clip", clip, 0, 1, low_open=True, high_open=True)
        self.beta, self.clip = beta, clip

    def count(self, batch: Batch) -> int:
        if len(batch) != 6:
            raise ValueError("the GRPO objective trains on rollouts (tokens, targets, old_logps, ref_logps, rewards, "
                             "advantages)")
        return batch[0].shape[0]

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, targets, old_logps, ref_logps, rewards, advantages = batch
        mask = (targets != IGNORE_INDEX).float()
        logps = -model(tokens, targets, reduction="none")  # (rows, width), 0 where no target
        per_seq, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, mask, self.beta, self.clip)
        lengths = mask.sum(-1)
        metrics.update(reward=rewards.sum(), completion_len=lengths.sum(),
                       entropy=((-logps.detach() * mask).sum(-1) / lengths.clamp(min=1)).sum())
        return per_seq.sum(), metrics


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-completion losses, summed metrics) from per-token log-probs (rows, width)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    surrogate = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    log_ref_ratio = ref_logps - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = surrogate + beta * kl
    lengths = mask.sum(-1).clamp(min=1)
    per_seq = (per_token * mask).sum(-1) / lengths
    clipped = ((ratio < 1 - clip) | (ratio > 1 + clip)).float()
    return per_seq, {"kl": ((kl.detach() * mask).sum(-1) / lengths).sum(),
                     "clip_fraction": ((clipped * mask).sum(-1) / lengths).sum()}


def group_batch(policy, tokens, targets, old_logps, ref_logps, rewards, group_size: int) -> tuple:
    """A rollout as GRPO's batch: the rewards' group-normalised advantages appended."""
    return tokens, targets, old_logps, ref_logps, rewards, group_advantages(rewards, group_size)
