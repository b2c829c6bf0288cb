"""A preallocated key/value cache for incremental decoding.

Keys are stored *after* rotary embedding, so cached keys are never rotated again (the original
project rotated them twice). Memory is allocated once, for the whole generation.

`update` takes the start position either as an int (eager decoding: attention reads the positions
written so far) or as a 0-dim tensor (a compiled decode step: every shape stays the same from one
token to the next, so one compiled graph serves the whole generation; attention reads the whole
buffer under a mask that hides the positions not written yet).

With a RoPE scaling that follows the length (dynamic NTK, CLEX), the model re-rotates the cached
keys whenever the frequencies change (`rope_inv_freq` records those they carry).

Rows of unequal length share the cache left-padded: `pad[b]` slots of row b come before its first
token. Slot indices stay common to all rows (one write per step for the whole batch); each row's
positions for the rotary embedding are its slot minus its padding, and its padding slots are masked
out of attention, so a row computes what it would alone.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 pad: torch.Tensor | None = None):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len
        self.pad: torch.Tensor | None = None
        # with a dynamic RoPE scaling: the inverse frequencies the cached keys were rotated with
        self.rope_inv_freq: torch.Tensor | None = None
        self.set_padding(pad)

    def set_padding(self, pad: torch.Tensor | None) -> None:
        """Left padding per row, (batch,) ints; None (or all zeros) when every row starts at slot 0.
        Changed only between generations: the cached slots of the old layout mean nothing after."""
        if pad is not None and not bool(pad.any()):
            pad = None
        self.pad = None if pad is None else pad.to(self.keys[0].device, torch.long)

    def positions(self, start_pos: int | torch.Tensor, new: int) -> torch.Tensor:
        """(batch, new) rotary positions of the slots start_pos .. start_pos + new - 1 (padding: 0)."""
        slots = start_pos + torch.arange(new, device=self.keys[0].device)
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def update(self, layer: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write k, v (batch, kv_heads, new, head_dim) at start_pos.

        Returns the keys and values to attend to and the boolean mask of what each new query may
        see ((new, keys), or (batch, 1, new, keys) with padding), or None when plain causal
        attention (or, for one query, no mask) is right.
        """
        new = k.shape[2]
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(new, device=k.device)
            self.keys[layer].index_copy_(2, positions, k)
            self.values[layer].index_copy_(2, positions, v)
            return self.keys[layer], self.values[layer], self._visible(positions, self.max_seq_len)
        end = start_pos + new
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked to write up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        mask = None
        if self.pad is not None:
            mask = self._visible(start_pos + torch.arange(new, device=k.device), end)
        elif start_pos > 0 and new > 1:  # new queries see all cached positions and the new ones up to themselves
            mask = torch.ones(new, end, dtype=torch.bool, device=k.device).tril(diagonal=start_pos)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], mask

    def _visible(self, queries: torch.Tensor, n_keys: int) -> torch.Tensor:
        keys = torch.arange(n_keys, device=queries.device)
        visible = keys[None, :] <= queries[:, None]  # (new, keys): written, and not in the future
        if self.pad is None:
            return visible
        # a padding slot sees only itself: its output is never used, but it must stay finite
        # (a row of nothing but -inf turns into NaN, and NaN times a zero weight is still NaN)
        real = keys[None, None, :] >= self.pad[:, None, None]
        itself = keys[None, None, :] == queries[None, :, None]
        return ((visible[None] & real) | itself).unsqueeze(1)  # (batch, 1, new, keys)
