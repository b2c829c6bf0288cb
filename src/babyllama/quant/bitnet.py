"""BitNet b1.58 (Ma et al., 2024): ternary weights {-1, 0, +1} times one scale per matrix, trained
by quantization-aware training.

While training, every projection of the blocks keeps float latent weights W and computes with
their ternary image, W~ = round(clip(W / mean|W|, -1, 1)) * mean|W|, on activations rounded to int8
per token (absmax / 127); the rounding is skipped in the backward pass (the straight-through
estimator), so W learns as if the forward were float while the forward already sees what the
packed model will compute. The embedding and the LM head stay in float, as in the paper.

`babyllama pretrain|sft --bitnet` applies `BitNet` (the checkpoints hold the float latent weights
under their usual names and record the transformation); `babyllama quantize --method bitnet`
packs the trained run: codes {0, 1, 2} = ternary + 1 at 2 bits a weight, the matrix's scale on
every row, run by the same low-bit kernel (which rounds activations to int8 per block of 32
rather than per token: the measured distance is in bench/quant.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama.transforms import QUANTIZE, register, replace_modules


def ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary values in {-1, 0, 1}, the matrix's scale mean|W|)."""
    scale = weight.abs().mean().clamp(min=1e-5)
    return torch.clamp(torch.round(weight / scale), -1, 1), scale


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 255 levels per token (absmax / 127), back in x's dtype."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return torch.clamp(torch.round(x * scale), -128, 127) / scale


class BitLinear(nn.Linear):
    """A bias-free projection computing with ternary weights and int8 activations, its float
    latent weight (the Parameter `weight`, as nn.Linear's) trained through straight-through rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, scale = ternary(self.weight)
        w = self.weight + (values * scale - self.weight).detach()
        x = x + (int8_per_token(x) - x).detach()
        return F.linear(x, w)


@register
class BitNet:
    name, order, trains_own_params = "bitnet", QUANTIZE, False

    def settings(self) -> dict:
        return {}

    def apply(self, model: nn.Module) -> None:
        def swap(name: str, module: nn.Module):
            if type(module) is not nn.Linear or not name.startswith("layers."):
                return None
            bit = BitLinear(module.in_features, module.out_features, bias=False, device=module.weight.device,
                            dtype=module.weight.dtype)
            bit.weight = module.weight  # the same Parameter: the optimizer and the checkpoint see no change
            return bit

        replace_modules(model, swap)
