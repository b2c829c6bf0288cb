"""Evaluation: perplexity at any context length (more benchmarks and the run report come next).
Imports nothing of training: it loads checkpoints through babyllama.checkpoint."""
