"""Round-to-nearest int8 weight-only quantization, one symmetric scale per output channel.

For a weight row w (one output channel), scale = max|w| / 127 and q = round(w / scale) in
[-127, 127], so w ~ q * scale with an error of at most scale / 2 per entry. The forward is
y = x @ (q * scale)^T, computed by `torch._weight_int8pack_mm` without ever forming the float
weights: a decoding step streams a quarter of float32's bytes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from babyllama.transforms import QUANTIZE, register, replace_modules


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, float32 scales) with weight ~ q * scales[:, None]; a zero row gets scale 1 (q 0)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights (out, in) and float32 per-row scales (buffers,
    so checkpoints store them as they are). Inference only: it has no trainable parameters."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("int8 quantization expects bias-free projections (the Llama here has none)")
        layer = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        layer.weight, layer.scales = quantize_rows(linear.weight)
        return layer

    def dequantized(self) -> torch.Tensor:
        """The float weights these int8 ones stand for (for tests and export; the forward never builds them)."""
        return self.weight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        scales = self.scales.to(rows.dtype)
        if rows.dtype == torch.float32 or rows.device.type != "cpu":
            y = torch._weight_int8pack_mm(rows, self.weight, scales)
        else:  # bf16/fp16 activations on CPU: the kernel's reduced-precision path loses too much; float32 it
            y = torch._weight_int8pack_mm(rows.float(), self.weight, self.scales).to(rows.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


@register
class QuantizeInt8:
    """Replace the model's linear projections (attention, feed-forward; and the LM head when it is
    not tied to the embedding, `head=True`) by `Int8Linear`s. The model is frozen: inference only."""

    name, order, trains_own_params = "int8_rtn", QUANTIZE, False

    def __init__(self, head: bool = False):
        self.head = head

    def settings(self) -> dict:
        return {"head": self.head}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        tied = getattr(model.config, "tie_embeddings", False)

        def swap(name: str, module: nn.Module):
            if type(module) is not nn.Linear or name.startswith(("rope.", "value_head.")):
                return None
            if name == "output" and (tied or not self.head):
                return None
            return Int8Linear.from_linear(module)

        replace_modules(model, swap)
        model.requires_grad_(False)
