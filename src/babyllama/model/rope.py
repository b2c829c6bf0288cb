"""Rotary position embeddings (RoPE), in the half-split layout that Hugging Face Llama uses.

Keeping HF's layout means an exported checkpoint needs no weight permutation. Scalings for long
context (linear, NTK, YaRN) will plug in by changing the inverse frequencies computed here.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim // 2), computed in float64 then cast."""
    positions = torch.arange(max_seq_len, dtype=torch.float64)
    angles = torch.outer(positions, rope_inv_freq(head_dim, theta))
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, heads, seq, head_dim) by per-position angles (seq, head_dim // 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
