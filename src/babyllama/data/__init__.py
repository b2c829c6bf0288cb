"""Data: readers for the corpora users bring, pretraining shards, batches (SFT formats come later)."""
