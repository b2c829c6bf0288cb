"""Quantization: quantized linears that replace `nn.Linear` from outside (a transformation, like LoRA).

Begun: round-to-nearest int8 weights with one scale per output channel, run by PyTorch's int8
weight-only matmul (`torch._weight_int8pack_mm`: the weights stay int8 in memory, never a float
copy). GPTQ, AWQ, 4-bit, LLM.int8 outliers and BitNet come next on the same seam.
Importing this package registers the transformation, so checkpoints that name it load.
"""

from babyllama.quant.int8 import Int8Linear, QuantizeInt8, quantize_rows

__all__ = ["Int8Linear", "QuantizeInt8", "quantize_rows"]
