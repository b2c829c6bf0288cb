"""The quantized linear layer that replaces `nn.Linear`, and the embedding a tied, quantized LM
head serves its rows from.

A `QuantLinear` holds what the checkpoint stores, packed: codes (`qweight`, uint8, 2/4/8 bits per
weight), per-group scales (float32) and integer zero points (uint8). Optionally a few input
columns are kept in float32 beside them (`outlier_index`, `outlier_weight`: LLM.int8's outlier
features; those columns are zero in the codes). Its forward runs the low-bit kernel on the packed
codes; the float weights are never built except for the few rows an embedding lookup needs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from babyllama.quant.kernels import dequantize_rows, lowbit_matmul
from babyllama.quant.pack import check_group_size, pack, rtn, storage_bits, unpack


class _LowbitLinear(torch.autograd.Function):
    """The kernel's product, differentiable in its input (the codes are frozen): what LoRA over a
    quantized base (QLoRA) needs to train adapters in the layers before this one."""

    @staticmethod
    def forward(ctx, rows, layer):
        ctx.layer = layer
        return lowbit_matmul(rows, layer.qweight, layer.scales, layer.offsets, storage_bits(layer.bits), layer.group_size)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        grad_in = torch.empty(grad.shape[0], layer.in_features, dtype=grad.dtype, device=grad.device)
        grad_in.zero_()
        for begin in range(0, layer.out_features, 4096):  # a slice of dequantized rows at a time
            end = begin + 4096
            w = dequantize_rows(layer.qweight[begin:end], layer.scales[begin:end], layer.offsets[begin:end],
                                storage_bits(layer.bits), layer.group_size)
            grad_in += grad[:, begin:end] @ w
        return grad_in, None


class QuantLinear(nn.Module):
    quantized = True  # what adapters look for: a frozen projection they may wrap (LoRA over it is QLoRA)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, n_outliers: int = 0,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = check_group_size(in_features, group_size)
        width, groups = storage_bits(bits), in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features * width // 8, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        # code * scale + offset = weight: the additive form the kernel takes, derived, never saved
        self.register_buffer("offsets", torch.zeros(out_features, groups, device=device), persistent=False)
        if n_outliers:
            self.register_buffer("outlier_index", torch.zeros(n_outliers, dtype=torch.long, device=device))
            self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers, device=device))
        else:
            self.outlier_index = self.outlier_weight = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   outlier_index: torch.Tensor | None = None, outlier_weight: torch.Tensor | None = None) -> "QuantLinear":
        """A layer from integer codes (out, in), scales and zero points (out, groups)."""
        out_features, in_features = codes.shape
        group = in_features // scales.shape[1]
        n_outliers = 0 if outlier_index is None else len(outlier_index)
        layer = cls(in_features, out_features, bits, group, n_outliers, device=codes.device)
        layer.qweight.copy_(pack(codes, bits))
        layer.scales.copy_(scales.float())
        layer.zeros.copy_(zeros.to(torch.uint8))
        if n_outliers:
            layer.outlier_index.copy_(outlier_index)
            layer.outlier_weight.copy_(outlier_weight.float())
        layer.refresh()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, sym: bool,
                    outlier_index: torch.Tensor | None = None) -> "QuantLinear":
        """Round to nearest (the baseline); `outlier_index` columns stay float32."""
        if linear.bias is not None:
            raise ValueError("quantization expects bias-free projections (the Llama here has none)")
        weight = linear.weight.detach().float()
        outlier_weight = None
        if outlier_index is not None and len(outlier_index):
            outlier_weight = weight[:, outlier_index].clone()
            weight = weight.clone()
            weight[:, outlier_index] = 0
        codes, scales, zeros = rtn(weight, bits, group_size, sym)
        return cls.from_codes(codes, scales, zeros, bits, outlier_index, outlier_weight)

    @torch.no_grad()
    def refresh(self) -> None:
        self.offsets.copy_(-self.zeros.float() * self.scales)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits)

    def dequantized(self) -> torch.Tensor:
        """The float weights the codes stand for, outlier columns included (tests and export only)."""
        w = dequantize_rows(self.qweight, self.scales, self.offsets, storage_bits(self.bits), self.group_size)
        if self.outlier_index is not None:
            w[:, self.outlier_index] = self.outlier_weight
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, shape[-1]).float()
        outliers = None
        if self.outlier_index is not None:  # outlier columns bypass the kernel (their large values would coarsen its int8 activations)
            outliers = rows[:, self.outlier_index]
            rows = rows.index_fill(1, self.outlier_index, 0.0)
        if rows.requires_grad and torch.is_grad_enabled():
            y = _LowbitLinear.apply(rows, self)
        else:
            y = lowbit_matmul(rows, self.qweight, self.scales, self.offsets, storage_bits(self.bits), self.group_size)
        if outliers is not None:
            y = y + outliers @ self.outlier_weight.t()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # moving to a device moves the buffers; casting the model to bf16 must not round the scales
        kept = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, b in kept.items():
            self._buffers[name] = b.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        outliers = f", {len(self.outlier_index)} float outlier columns" if self.outlier_index is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}{outliers}"


class QuantEmbedding(nn.Module):
    """Token embeddings read from a tied, quantized LM head: a lookup dequantizes only the rows it
    needs. It holds no state of its own (the head's buffers are saved once, under `output.`)."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: no second copy in state dicts
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        # empty, but cast with the model: the dtype the layers after it expect
        self.register_buffer("dtype_probe", torch.zeros(0), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        head, flat = self.head, tokens.reshape(-1)
        rows = dequantize_rows(head.qweight[flat], head.scales[flat], head.offsets[flat], storage_bits(head.bits),
                               head.group_size)
        if head.outlier_index is not None:
            rows[:, head.outlier_index] = head.outlier_weight[flat]
        return rows.to(self.dtype_probe.dtype).reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantized LM head"
