"""Inference: the Engine (batched KV-cache generation, text and chat), sampling, the decoding layout."""

from babyllama.infer.engine import Engine
from babyllama.infer.generate import generate_tokens, load_for_inference
from babyllama.infer.sampling import SamplingConfig

__all__ = ["Engine", "generate_tokens", "load_for_inference", "SamplingConfig"]
