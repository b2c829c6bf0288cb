"""Make a model faster at token-by-token decoding on the CPU, without changing its results.

Decoding a batch of one multiplies every weight matrix by a single vector, so it is bound by how
fast the weights stream from memory. `nn.Linear` computes x @ W.T with W stored (out, in); for one
row, the BLAS kernels that layout reaches read memory at ~10 GB/s on our 2-core test machine, while
the same product with W stored transposed, (in, out), runs at ~26 GB/s (measured: the 64,794 x 512
LM head in 12.4 vs 5.1 ms). `prepare_for_decoding` stores every projection transposed once, at load
time; the arithmetic is the same, so the tokens are the same (tested).

The prepared model is for inference only: its linear layers hold `weight_t` buffers instead of
parameters, and its LM head is a transposed copy of the (tied) embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TransposedLinear(nn.Module):
    """y = x @ W.T with W kept as its contiguous transpose (in, out)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("TransposedLinear takes bias-free layers (the Llama here has none)")
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t


@torch.no_grad()
def prepare_for_decoding(model: nn.Module) -> nn.Module:
    """In place; returns the model (in eval mode). A no-op on GPUs, whose GEMV does not care."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or getattr(model, "_prepared_for_decoding", False):
        return model
    model.eval()
    head_t = model.output_weight.detach().t().contiguous()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, TransposedLinear(child))
    # an instance attribute shadows Llama.logits; the model class itself stays untouched
    object.__setattr__(model, "logits", lambda x: x @ head_t)
    object.__setattr__(model, "_prepared_for_decoding", True)
    return model
