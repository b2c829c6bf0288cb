"""The Llama model. It knows nothing about training, data, distribution or quantization."""

from babyllama.config import ModelConfig
from babyllama.model.kv_cache import KVCache
from babyllama.model.llama import Llama

__all__ = ["Llama", "ModelConfig", "KVCache"]
