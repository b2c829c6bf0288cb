"""Inference: sampling, generation with a KV cache, streaming text (chat comes with SFT)."""

from babyllama.infer.generate import generate_text, generate_tokens, load_for_inference
from babyllama.infer.sampling import SamplingConfig

__all__ = ["generate_tokens", "generate_text", "load_for_inference", "SamplingConfig"]
