"""A preallocated key/value cache for incremental decoding.

Keys are stored *after* rotary embedding, so cached keys are never rotated again (the original
project rotated them twice). Memory is allocated once, for the whole generation.

`update` takes the start position either as an int (eager decoding: attention reads the positions
written so far) or as a 0-dim tensor (a compiled decode step: every shape stays the same from one
token to the next, so one compiled graph serves the whole generation; attention reads the whole
buffer under a mask that hides the positions not written yet).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len

    def update(self, layer: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write k, v (batch, kv_heads, new, head_dim) at start_pos.

        Returns the keys and values to attend to and the (new, keys) boolean mask of what each new
        query may see, or None when plain causal attention (or, for one query, no mask) is right.
        """
        new = k.shape[2]
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(new, device=k.device)
            self.keys[layer].index_copy_(2, positions, k)
            self.values[layer].index_copy_(2, positions, v)
            visible = torch.arange(self.max_seq_len, device=k.device)[None, :] <= positions[:, None]
            return self.keys[layer], self.values[layer], visible
        end = start_pos + new
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked to write up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        mask = None
        if start_pos > 0 and new > 1:  # new queries see all cached positions and the new ones up to themselves
            mask = torch.ones(new, end, dtype=torch.bool, device=k.device).tril(diagonal=start_pos)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], mask
