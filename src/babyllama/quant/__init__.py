"""Quantization: quantized linears that replace `nn.Linear` from outside (a transformation, like LoRA).

Begun: round-to-nearest int8 weights with one scale per output channel, run by PyTorch's int8
weight-only matmul (`torch._weight_int8pack_mm`: the weights stay int8 in memory, never a float
copy). Correct, but not yet fast: measured here (2-core AMD EPYC, 2026-11-30) one (1 x 512) @
(512 x 3072) product took 1,202 us through `_weight_int8pack_mm` against 213 us in float32, while
fbgemm's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`, int8 activations too) took 75-89
us at 1-2% relative error. The kernel is to be chosen by measurement (bench/quant.py, next). GPTQ,
AWQ, 4-bit, LLM.int8 outliers and BitNet come next on the same seam.
Importing this package registers the transformation, so checkpoints that name it load.
"""

from babyllama.quant.int8 import Int8Linear, QuantizeInt8, quantize_rows

__all__ = ["Int8Linear", "QuantizeInt8", "quantize_rows"]
