"""Quantization: packed low-bit linears that replace `nn.Linear` from outside (a transformation,
like LoRA), the methods that choose their codes (RTN, GPTQ, AWQ, LLM.int8 outliers, BitNet b1.58
ternary weights trained by QAT), and the
kernel that multiplies by them without unpacking to float (kernels/).

Importing this package registers the transformation, so checkpoints that name it load.
The stage that quantizes a run (`babyllama quantize`) is quant/stage.py, imported by the CLI only.
"""

from babyllama.quant.bitnet import BitLinear, BitNet
from babyllama.quant.linear import QuantEmbedding, QuantLinear
from babyllama.quant.transform import METHODS, Quantize

__all__ = ["METHODS", "BitLinear", "BitNet", "QuantEmbedding", "QuantLinear", "Quantize"]
