"""Adapters: small trained updates over a frozen model, applied as transformations (transforms.py).

Used by every stage that loads a model (training, inference, evaluation, export), so they sit below
the stages, like the model. Importing this package registers them for checkpoints to name.
"""

from babyllama.adapters.heads import ScalarHead, ValueHead, is_scorer, value_tap
from babyllama.adapters.lora import LoRA, LoraConfig, LoraLinear, count_parameters, merge_adapters

__all__ = ["LoRA", "LoraConfig", "LoraLinear", "ScalarHead", "ValueHead", "count_parameters", "is_scorer",
           "merge_adapters", "value_tap"]
