"""`Quantize`: the transformation that puts `QuantLinear`s in place of the model's projections.

Applied to a float model it rounds to nearest (RTN). The calibrated methods (GPTQ, AWQ, LLM.int8's
outlier columns; quant/stage.py) replace the layers themselves, block by block, and then record
this same transformation; loading a checkpoint applies it again (placeholders of the recorded
shapes, then filled by the saved codes). Which layers: every projection of every block, and the
LM head unless `head=False`; a head tied to the embedding then also serves the embedding lookups
(`QuantEmbedding`), so the 64k x dim matrix is stored once, quantized.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from babyllama.quant.linear import QuantEmbedding, QuantLinear
from babyllama.transforms import QUANTIZE, register, replace_modules

METHODS = ("rtn", "gptq", "awq", "int8", "bitnet")


def quantizable(name: str, module: nn.Module, head: bool) -> bool:
    """The plain projections a quantization replaces: the blocks' and (with `head`) the LM head."""
    return type(module) is nn.Linear and (name.startswith("layers.") or (head and name == "output"))


@register
class Quantize:
    name, order, trains_own_params = "quantize", QUANTIZE, False

    def __init__(self, method: str = "rtn", bits: int = 4, group_size: int = 128, sym: bool = False,
                 head: bool = True, outliers: dict[str, int] | None = None, details: dict[str, Any] | None = None):
        self.method, self.bits, self.group_size, self.sym, self.head = method, bits, group_size, sym, head
        self.outliers = dict(outliers or {})  # layer name -> number of float columns it keeps
        self.details = dict(details or {})  # how it was made (calibration, damping, ...): recorded, not needed to load

    def settings(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "head": self.head, "outliers": self.outliers, "details": self.details}

    def group_for(self, in_features: int) -> int:
        """The group size used for a layer of this width: the setting where it divides the width (one
        group per row where it is wider), else the largest multiple of 32 below it that does (the
        feed-forward width 1376 = 43 x 32 takes 32 for 128), else one group per row."""
        g = self.group_size
        if g <= 0 or g >= in_features:
            return in_features
        if in_features % g == 0:
            return g
        fits = [d for d in range(32, g, 32) if in_features % d == 0]
        return fits[-1] if fits else in_features

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        def swap(name: str, module: nn.Module):
            if not quantizable(name, module, self.head):
                return None
            n_outliers = self.outliers.get(name, 0)
            if n_outliers:  # a placeholder of the recorded shape, which the checkpoint's codes fill
                return QuantLinear(module.in_features, module.out_features, self.bits,
                                   self.group_for(module.in_features), n_outliers, device=module.weight.device)
            return QuantLinear.from_linear(module, self.bits, self.group_for(module.in_features), self.sym)

        replace_modules(model, swap)
        tie_quantized_head(model)
        model.requires_grad_(False)


def tie_quantized_head(model: nn.Module) -> None:
    """With tied embeddings and a quantized head, look tokens up in the head's codes."""
    if getattr(model.config, "tie_embeddings", False) and isinstance(model.output, QuantLinear) \
            and not isinstance(model.tok_embeddings, QuantEmbedding):
        model.tok_embeddings = QuantEmbedding(model.output)


def to_float(model: nn.Module) -> int:
    """Undo the quantization for formats that hold float weights (export): every `QuantLinear`
    becomes the `nn.Linear` of the values its codes stand for, a BitNet projection the `nn.Linear`
    of its ternary weights times their scale, and a quantized tied head serves the embedding again.
    The outputs then differ from the quantized model's only by the activation rounding its kernel
    (or BitNet's int8 activations) does. Returns how many layers changed."""
    from babyllama.quant.bitnet import BitLinear, ternary
    from babyllama.transforms import unrecord

    def swap(name: str, module: nn.Module):
        if isinstance(module, QuantLinear):
            weight = module.dequantized()
        elif isinstance(module, BitLinear):
            values, scale = ternary(module.weight.detach())
            weight = values * scale
        else:
            return None
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        linear.weight = nn.Parameter(weight.float(), requires_grad=False)
        return linear

    tied_quantized = isinstance(model.tok_embeddings, QuantEmbedding)
    count = replace_modules(model, swap)
    if tied_quantized:
        model.tok_embeddings = nn.Embedding(model.config.vocab_size, model.config.dim, device=model.output.weight.device)
        model.tok_embeddings.weight = model.output.weight
    unrecord(model, Quantize.name)
    unrecord(model, "bitnet")
    return count
