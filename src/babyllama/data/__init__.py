"""Data: pretraining shards, SFT formats and datasets, batch sources, the built-in corpus. Reading
raw files is corpus/'s job."""
