"""Shifted sparse attention (S2-Attn), from LongLoRA (Chen et al. 2023), as a model transformation.

LongLoRA fine-tunes a model at a longer context than it was trained on without paying for full
attention over the whole sequence: while training, the sequence is cut into groups of G tokens and
each token attends (causally) only inside its own group. Half of the heads use groups shifted by
G/2, so a group of the shifted heads straddles two groups of the unshifted ones and information
flows from group to group across layers. At inference the model runs plain full attention: the
weights learnt this way work with it, which is the point of the method.

The shifted heads' groups are [0, G/2), [G/2, 3G/2), [3G/2, 5G/2), ..., [T-G/2, T). The original
implementation rolls those heads by -G/2 and keeps the wrapped-around last group whole, so the
first G/2 tokens there attend to the last G/2 tokens of the sequence: a leak of the future into a
causal model. Here that group is split in two (a block-diagonal mask): a token only ever sees
earlier-or-equal tokens of its own group.

Cost: attention inside groups is T/G blocks of G x G, so time and memory are O(T*G), not O(T^2).
The sequence length must be a multiple of G while S2-Attn is active.

With an odd number of heads the last floor(H/2) heads are shifted (one head alone is never
shifted). `apply_s2_attn(model, G)` wraps every `DotProductAttention` of the model; the wrapper
falls back to the wrapped module (full attention) in eval mode, with a mask or a KV cache, and for
sequences no longer than one group.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama.model.llama import DotProductAttention
from babyllama.transforms import replace_modules


def _shifted_group_mask(group_size: int, device: torch.device) -> torch.Tensor:
    """(G, G) bool mask for the shifted heads' last (wrapped-around) group: it holds the tokens
    [T-G/2, T) then [0, G/2); each half may only see itself, causally, or the first tokens would
    see the last ones."""
    idx = torch.arange(group_size, device=device)
    half = group_size // 2
    same_half = (idx[:, None] < half) == (idx[None, :] < half)
    return same_half & (idx[None, :] <= idx[:, None])


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H * T/G, G, D): each (head, group) pair becomes a "head" of SDPA's 4-D
    input; a view, not a copy, when x is laid out (B, H, T, D) (no transpose of the data)."""
    B, H, T, D = x.shape
    return x.reshape(B, H * (T // group_size), group_size, D)


def _ungrouped(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H * T/G, G, D) -> (B, H, T, D)."""
    B, _, G, D = x.shape
    return x.reshape(B, heads, -1, D)


def shifted_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Causal S2-Attn over (batch, heads, seq, head_dim); k and v have as many heads as q.

    The first H - H//2 heads attend inside groups [0,G), [G,2G), ...; the last H//2 inside groups
    shifted by G/2, with the two end pieces [0, G/2) and [T-G/2, T) groups of their own."""
    B, H, T, D = q.shape
    G = group_size
    if T % G:
        raise ValueError(f"shifted sparse attention (train.s2_group_size={G}) needs a sequence length that is a "
                         f"multiple of the group size, got length {T}: set train.s2_group_size to a divisor "
                         f"of the sequence length")
    half, n_groups = G // 2, T // G
    n_shifted = H // 2
    n_plain = H - n_shifted

    # unshifted heads: every group is plainly causal, so is_causal lets SDPA pick a fused kernel
    plain = F.scaled_dot_product_attention(_grouped(q[:, :n_plain], G), _grouped(k[:, :n_plain], G),
                                           _grouped(v[:, :n_plain], G), is_causal=True, dropout_p=dropout_p)
    if n_shifted == 0:
        return _ungrouped(plain, n_plain)

    # rolled by -G/2, the shifted groups line up with the unshifted grid; only the last group (the
    # wrapped-around one) needs the split mask, the others are causal: a (groups, G, G) mask
    # shared by the batch, O(T*G) like the rest
    def rolled(x: torch.Tensor) -> torch.Tensor:
        return _grouped(x[:, n_plain:].roll(-half, dims=2), G)

    per_group = torch.ones(G, G, dtype=torch.bool, device=q.device).tril().expand(n_groups, G, G).clone()
    per_group[-1] = _shifted_group_mask(G, q.device)
    mask = per_group.repeat(n_shifted, 1, 1).unsqueeze(0)  # (1, shifted heads * groups, G, G)
    shifted = F.scaled_dot_product_attention(rolled(q), rolled(k), rolled(v), attn_mask=mask, dropout_p=dropout_p)
    shifted = _ungrouped(shifted, n_shifted).roll(half, dims=2)
    return torch.cat([_ungrouped(plain, n_plain), shifted], dim=1)


class ShiftedSparseAttention(nn.Module):
    """Wraps a `DotProductAttention` (kept as `inner`, its dropout with it): S2-Attn while training
    on plain causal sequences longer than one group, the wrapped full attention otherwise."""

    def __init__(self, inner: DotProductAttention, group_size: int):
        super().__init__()
        _check_group_size(group_size)
        self.inner = inner
        self.group_size = group_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        # inference (full attention, as LongLoRA), cached decoding and packed segments (a mask) keep
        # the original path: S2-Attn is only a cheaper way to train at a long context
        if self.training and mask is None and causal and q.shape[2] > self.group_size:
            return shifted_sparse_attention(q, k, v, self.group_size, dropout_p=self.inner.dropout)
        return self.inner(q, k, v, mask, causal)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


def _check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"train.s2_group_size must be an even integer >= 2 (half a group is the shift), "
                         f"got {group_size!r}")


def apply_s2_attn(model: nn.Module, group_size: int) -> int:
    """Swap every `DotProductAttention` (exact type) of `model` for a `ShiftedSparseAttention` with
    groups of `group_size` tokens, in place; returns how many were swapped."""
    _check_group_size(group_size)
    if any(isinstance(m, ShiftedSparseAttention) for m in model.modules()):
        # the walk would go inside the wrappers and wrap their inner module a second time
        raise ValueError("S2-Attn is already applied to this model")
    return replace_modules(model, lambda name, m: ShiftedSparseAttention(m, group_size)
                           if type(m) is DotProductAttention else None)
