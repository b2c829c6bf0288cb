"""Batches of training windows from pretraining shards: deterministic, resumable, rank-aware.

The token stream is cut into non-overlapping windows of `seq_len + 1` tokens (inputs and their
next-token targets). Each epoch visits every window once in an order drawn from (seed, epoch);
only window *order* is shuffled, never the tokens inside a window, so documents stay intact.
The position (epoch, cursor) is the whole state: saving it and restoring it resumes exactly.
With several processes, rank r takes windows r, r + world, ... of each global batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from babyllama.data.batches import ShuffledBatches
from babyllama.data.pretrain import load_manifest
from babyllama.corpus.readers import DataError


SCAN_LIMIT_BYTES = 2 << 30  # shards up to this size in all are checked for bad ids up front (~1 s)


class TokenWindows:
    """All complete windows of one split, addressed by a flat index."""

    def __init__(self, directory: str | Path, split: str, seq_len: int, vocab_limit: int | None = None):
        directory = Path(directory)
        self.manifest = load_manifest(directory)
        self.seq_len, self.vocab_limit = seq_len, vocab_limit
        self.files: list[Path] = []
        dtype = np.dtype(self.manifest["dtype"])
        self.shards, counts = [], []
        for shard in self.manifest["splits"][split]["shards"]:
            path = directory / shard["file"]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in the manifest is missing")
            expected = shard["tokens"] * dtype.itemsize
            if path.stat().st_size != expected:
                raise DataError(f"{path}: {path.stat().st_size} bytes, manifest says {expected}; "
                                f"the shard is truncated or from another run")
            data = np.memmap(path, dtype=dtype, mode="r")
            self.shards.append(data)
            self.files.append(path)
            counts.append(max(0, (len(data) - 1) // seq_len))  # windows overlap by the one target token
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_windows = int(self.starts[-1])
        if vocab_limit is not None and sum(d.nbytes for d in self.shards) <= SCAN_LIMIT_BYTES:
            self._scan_ids()

    def _scan_ids(self) -> None:
        """Find ids past the vocabulary before training: batches check themselves too, but a bad window
        drawn late would stop a run hours in. Larger datasets rely on the per-batch check alone."""
        for path, data in zip(self.files, self.shards):
            for start in range(0, len(data), 1 << 24):
                block = data[start:start + (1 << 24)]
                if block.size and int(block.max()) >= self.vocab_limit:
                    at = start + int(np.flatnonzero(block >= self.vocab_limit)[0])
                    raise DataError(f"{path}: token {at:,} is id {int(data[at])}, outside the model's vocabulary "
                                    f"of {self.vocab_limit}; the shard is damaged or was made with another "
                                    f"tokenizer (prepare the data again)")

    def window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        offset = (index - int(self.starts[shard])) * self.seq_len
        return self.shards[shard][offset:offset + self.seq_len + 1]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        if self.vocab_limit is not None and rows.size and int(rows.max()) >= self.vocab_limit:
            self._out_of_range(indices)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]


    def _out_of_range(self, indices) -> None:
        """Ids the model has no embedding for: a damaged shard, or one from another tokenizer."""
        for i in indices:
            window = self.window(int(i))
            bad = np.flatnonzero(window >= self.vocab_limit)
            if bad.size:
                shard = int(np.searchsorted(self.starts, int(i), side="right") - 1)
                offset = (int(i) - int(self.starts[shard])) * self.seq_len + int(bad[0])
                raise DataError(f"{self.files[shard]}: token {offset:,} is id {int(window[bad[0]])}, outside the "
                                f"model's vocabulary of {self.vocab_limit}; the shard is damaged or was made with "
                                f"another tokenizer (prepare the data again)")


class PretrainBatches(ShuffledBatches):
    """An endless, shuffled, resumable stream of (tokens, targets) micro-batches."""

    def __init__(self, directory: str | Path, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, split: str = "train", vocab_limit: int | None = None):
        self.windows = TokenWindows(directory, split, seq_len, vocab_limit)
        self.num_items = self.windows.num_windows
        if self.num_items < batch_size * world_size:
            raise DataError(f"{directory}: the {split} split has {self.num_items} windows of "
                            f"{seq_len + 1} tokens, fewer than one batch ({batch_size * world_size}); "
                            f"use more data, a smaller batch_size or a shorter max_seq_len")
        super().__init__(batch_size, seed, rank, world_size)

    def make_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.batch(indices)


def validation_batches(directory: str | Path, seq_len: int, batch_size: int, max_batches: int,
                       vocab_limit: int | None = None):
    """A fixed list of validation batches (the same windows at every evaluation)."""
    windows = TokenWindows(directory, "val", seq_len, vocab_limit)
    if windows.num_windows == 0:
        raise DataError(f"{directory}: the validation split has no complete window of {seq_len + 1} tokens; "
                        f"prepare the data with a larger --val-fraction")
    n = min(windows.num_windows, batch_size * max_batches)
    # spread the chosen windows over the whole split rather than taking its head
    picks = np.linspace(0, windows.num_windows - 1, n).round().astype(np.int64)
    return [windows.batch(picks[i:i + batch_size]) for i in range(0, n, batch_size)]
