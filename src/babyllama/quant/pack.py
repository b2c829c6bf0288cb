"""Integer grids and bit packing: the arithmetic every quantization method shares.

A weight row is cut into groups of `group_size` columns; each group has a scale s and an integer
zero point z, and a weight w is stored as q = clamp(round(w / s) + z, 0, 2^bits - 1), standing for
(q - z) * s. Symmetric grids put z in the middle (w's sign is kept, 0 exact); asymmetric ones fit
[min, max] of the group (one more usable level for skewed groups). On disk and in memory the
codes are packed little end first: 8 bits one per byte, 4 two per byte (even column in the low
nibble), 2 four per byte. 3-bit codes are stored in 4-bit slots (the kernel reads 2, 4 or 8 bits),
so a 3-bit model is as large as a 4-bit one: only its grid is coarser.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def storage_bits(bits: int) -> int:
    """The packed width of a `bits`-bit code."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    return 4 if bits == 3 else bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integer codes in [0, 2^bits) -> (rows, cols * width / 8) uint8."""
    width = storage_bits(bits)
    per_byte = 8 // width
    rows, cols = codes.shape
    if cols % per_byte:
        raise ValueError(f"{cols} columns do not pack {per_byte} to a byte")
    slots = codes.to(torch.int32).reshape(rows, cols // per_byte, per_byte)
    out = torch.zeros(rows, cols // per_byte, dtype=torch.int32, device=codes.device)
    for i in range(per_byte):
        out |= slots[:, :, i] << (width * i)
    return out.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: (rows, bytes) uint8 -> (rows, cols) uint8 codes."""
    width = storage_bits(bits)
    per_byte = 8 // width
    mask = (1 << width) - 1
    wide = packed.to(torch.int32)
    parts = [(wide >> (width * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1).to(torch.uint8)


def grid(weight: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) for each row of `weight` (rows, n): the grid RTN and GPTQ round onto.
    A row of zeros gets scale 1 so that it stays exactly zero."""
    maxq = 2 ** bits - 1
    w = weight.float()
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / maxq
    empty = scale == 0
    scale = torch.where(empty, torch.ones_like(scale), scale)
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of `weight` (rows, n) on per-row grids (scale, zero: (rows,) or broadcastable)."""
    maxq = 2 ** bits - 1
    return torch.clamp(torch.round(weight.float() / scale[:, None]) + zero[:, None], 0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale[:, None] * (codes.float() - zero[:, None])


def check_group_size(in_features: int, group_size: int) -> int:
    """The effective group size (0 or -1: one group per row), checked against the width."""
    group = in_features if group_size in (0, -1) else group_size
    if group <= 0 or in_features % group:
        raise ValueError(f"group size {group_size} does not divide the layer width {in_features}; "
                         f"use a divisor of it (e.g. 32, 64, 128) or 0 for one group per row")
    return group


def rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest, group by group: (codes (out, in) uint8, scales (out, groups), zeros (out, groups))."""
    out_features, in_features = weight.shape
    group = check_group_size(in_features, group_size)
    groups = weight.float().reshape(out_features * (in_features // group), group)
    scale, zero = grid(groups, bits, sym)
    codes = quantize_codes(groups, scale, zero, bits)
    n_groups = in_features // group
    return (codes.reshape(out_features, in_features).to(torch.uint8), scale.reshape(out_features, n_groups),
            zero.reshape(out_features, n_groups))
