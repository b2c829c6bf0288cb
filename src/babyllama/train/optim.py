"""AdamW with weight decay on matrices only, and a warmup + cosine schedule in optimizer steps."""

from __future__ import annotations

import inspect
import math

import torch

from babyllama.config import TrainConfig


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # weights and embeddings
    no_decay = [p for p in params if p.dim() < 2]  # norm gains (and biases, if any)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    kwargs = {}
    # the fused kernel exists for CUDA and (torch >= 2.4) CPU: one pass per tensor instead of ~10
    # (measured 3x faster than foreach on the CPU); fall back to foreach elsewhere
    if device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kwargs)


def lr_at(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, cosine decay to min_lr.

    `time_used` is the share of train.max_minutes spent so far (0 without a time budget). The decay
    follows the larger of the two shares, steps done and time used, so a run that the clock stops
    early (a busy machine) still ends with its learning rate decayed, not with the cosine barely
    begun. Without a time budget the schedule is a function of the step alone (exact resume)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), min(time_used, 1.0))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
