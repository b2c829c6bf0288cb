"""GPTQ (Frantar et al., 2022): quantize a layer's weight columns one at a time, each time moving
the rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction error on calibration inputs, H = 2/n X^T X. Column i's error e_i =
(w_i - q_i) / [H^-1]_ii is spread as W[:, j>i] -= e_i [H^-1]_ij, with the upper Cholesky factor of
H^-1 standing for the inverse after each elimination (the paper's numerically stable form).

As in the paper: damping (a fraction of the mean diagonal added to H), lazy batched updates (the
error of a block of columns reaches the columns after it in one matrix product), `act_order`
(columns in order of decreasing H_ii, the most sensitive first) and groups. With act_order the
groups' grids are fixed from the original weights before any update ("static groups"), so each
group stays a contiguous run of columns, as the kernel reads them; without it a group's grid is
fitted when its first column is reached, on the already-updated weights.
"""

from __future__ import annotations

import torch

from babyllama.quant.pack import check_group_size, grid


class Hessian:
    """Accumulates H = 2/n X^T X over calibration inputs of one layer (float32, like the paper)."""

    def __init__(self, in_features: int):
        self.matrix = torch.zeros(in_features, in_features)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        n = rows.shape[0]
        self.matrix *= self.count / (self.count + n)
        self.count += n
        rows = rows * (2 / self.count) ** 0.5
        self.matrix += rows.t() @ rows


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
         act_order: bool = False, damp: float = 0.01, block: int = 128
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, in) uint8, scales (out, groups), zero points (out, groups)) for `weight`."""
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    out_features, cols = W.shape
    group = check_group_size(cols, group_size)
    maxq = 2 ** bits - 1
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0

    block = group * max(1, block // group)  # so that a group never straddles two blocks (its grid sees updated weights)
    n_groups = cols // group
    scales, zeros = torch.zeros(out_features, n_groups), torch.zeros(out_features, n_groups)
    if act_order:  # static groups: every grid from the original weights, before any error moves
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = grid(W[:, g * group:(g + 1) * group], bits, sym)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(out_features, cols)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        W1, Err1, Hinv1 = W[:, start:end].clone(), torch.zeros(out_features, end - start), Hinv[start:end, start:end]
        for i in range(end - start):
            column = perm[start + i]  # its place in the original order: which group it belongs to
            g = int(column) // group
            if not act_order and int(column) % group == 0:  # a new group: fit its grid on the updated weights
                ahead = torch.cat([W1[:, i:], W[:, end:]], dim=1)[:, :group]
                scales[:, g], zeros[:, g] = grid(ahead, bits, sym)
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.clamp(torch.round(w / scales[:, g]) + zeros[:, g], 0, maxq)
            codes[:, start + i] = q
            err = (w - scales[:, g] * (q - zeros[:, g])) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    return codes.to(torch.uint8), scales, zeros
