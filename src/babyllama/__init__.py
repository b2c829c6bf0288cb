"""babyllama: train a small Chinese Llama from raw text, and use it."""

__version__ = "0.1.0"
