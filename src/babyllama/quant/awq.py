"""AWQ (Lin et al., 2023): a few input channels carry large activations, and their weights matter
most. Scaling those weight columns up by s (and the layer's input down by s, folded into whatever
produces the input: an RMSNorm's gain or the rows of the projection before) is exact in float but
lets the rounding grid spend its levels where the activations are large. s = mean|x|^alpha per
input channel, with alpha chosen on a grid over [0, 1) by the error of the quantized layer's
output on calibration inputs; the scaled weights are then rounded to nearest, group by group.
(AutoAWQ's second step, a search over clipping ranges, is not done here.)
"""

from __future__ import annotations

import torch

from babyllama.quant.pack import dequantize_codes, grid, quantize_codes

ALPHAS = [i / 20 for i in range(20)]


def fake_quantize(weight: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    """RTN to the grid and back to float (what the quantized layer computes with)."""
    rows, cols = weight.shape
    groups = weight.reshape(-1, group)
    scale, zero = grid(groups, bits, sym)
    return dequantize_codes(quantize_codes(groups, scale, zero, bits), scale, zero).reshape(rows, cols)


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], x: torch.Tensor, bits: int, group: int, sym: bool
                  ) -> tuple[torch.Tensor, float, float, float]:
    """(per-input-channel scales, chosen alpha, its output error, alpha 0's error = plain RTN) for
    the layers in `weights` that all read the inputs `x` (tokens, in)."""
    x = x.float()
    magnitude = x.abs().mean(dim=0)
    reference = [x @ w.float().t() for w in weights]
    best, best_alpha, best_error, rtn_error = None, 0.0, float("inf"), float("inf")
    for alpha in ALPHAS:
        s = magnitude.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centred, so that neither end of the range overflows the grid
        error = 0.0
        for w, ref in zip(weights, reference):
            q = fake_quantize(w.float() * s, bits, group, sym) / s
            error += float((x @ q.t() - ref).pow(2).mean())
        if alpha == 0:
            rtn_error = error
        if error < best_error:
            best, best_alpha, best_error = s, alpha, error
    return best, best_alpha, best_error, rtn_error
