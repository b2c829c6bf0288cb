"""The batch sources draw their orders from fixed random streams: a run resumed from a checkpoint, or
repeated with the same seed, must see the very same batches. These expectations were recorded from
the code before the sources shared `ShuffledBatches`; any change to a stream (the seed formula, the
number or order of draws, the grouping, the rank split, the epoch rollover) breaks them."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from babyllama.config import IGNORE_INDEX
from babyllama.data.loader import PretrainBatches
from babyllama.data.pretrain import FORMAT, MANIFEST
from babyllama.data.sft import PackedSFTBatches, SFTBatches, SFTSample


def _pretrain_dir(path):
    """Two shards of consecutive token ids (window k of shard s starts at a known id)."""
    shards, start = [], 0
    for k, n in enumerate((1000, 777)):
        name = f"train-{k:05d}.bin"
        (np.arange(start, start + n) % 65536).astype(np.uint16).tofile(path / name)
        shards.append({"file": name, "tokens": n, "documents": 1})
        start += n
    manifest = {"format": FORMAT, "dtype": "uint16", "splits": {"train": {"shards": shards}}}
    (path / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return path


def _sft_samples(lengths):
    return [SFTSample([k + 1] * n, [IGNORE_INDEX] * (n - 2) + [k + 1] * 2) for k, n in enumerate(lengths)]


def _plain(entries):
    return [[int(i) for i in e] if isinstance(e, list) else int(e) for e in entries]


def _trace(make, steps: int, resume_at: int):
    """Per rank: (the first two shares of indices, the state after `steps`, a hash of every share and
    every batch tensor). The tensors come from a second source that is saved at `resume_at` and
    continued by a third, so the hash also covers resuming."""
    out = {}
    for rank in range(2):
        a = make(rank)
        h = hashlib.sha256()
        shares = [_plain(a.next_indices()) for _ in range(steps)]
        for share in shares:
            h.update(json.dumps(share).encode())
        b = make(rank)
        for step in range(steps):
            if step == resume_at:
                state = b.state_dict()
                b = make(rank)
                b.load_state_dict(state)
            for t in b.next_batch():
                h.update(t.numpy().tobytes())
        assert b.state_dict() == a.state_dict()
        out[rank] = (shares[:2], a.state_dict(), h.hexdigest()[:16])
    return out


def test_pretrain_batches_are_unchanged(tmp_path):
    data = _pretrain_dir(tmp_path)
    trace = _trace(lambda r: PretrainBatches(data, 16, 3, seed=7, rank=r, world_size=2), 40, resume_at=25)
    assert trace == EXPECTED["pretrain"]  # 110 windows, 18 batches an epoch: two rollovers


def test_sft_batches_are_unchanged():
    samples = _sft_samples([3 + (k * 13) % 40 for k in range(600)])  # three length-sorting windows
    trace = _trace(lambda r: SFTBatches(samples, 2, pad_id=0, seed=11, rank=r, world_size=2), 160, resume_at=151)
    assert trace == EXPECTED["sft"]


def test_packed_sft_batches_are_unchanged():
    samples = _sft_samples([5 + (k * 7) % 30 for k in range(200)])  # 93 rows of 40 tokens
    trace = _trace(lambda r: PackedSFTBatches(samples, 2, pad_id=0, capacity=40, seed=13, rank=r, world_size=2),
                   40, resume_at=30)
    assert trace == EXPECTED["packed"]


@pytest.mark.parametrize("state", [{"epoch": 0, "cursor": 0}, {"epoch": 3, "cursor": 12}])
def test_state_is_epoch_and_cursor(tmp_path, state):
    sources = [PretrainBatches(_pretrain_dir(tmp_path), 16, 3),
               SFTBatches(_sft_samples([4] * 20), 2, pad_id=0),
               PackedSFTBatches(_sft_samples([4] * 20), 2, pad_id=0, capacity=8)]
    for source in sources:
        source.load_state_dict(state)
        assert source.state_dict() == state


# per source and rank: (first two shares, state after the run, hash), recorded before the refactor
EXPECTED = {
    "pretrain": {0: ([[53, 84, 4], [55, 41, 57]], {"epoch": 2, "cursor": 24}, "7e9b765491501985"),
                 1: ([[89, 74, 48], [7, 54, 87]], {"epoch": 2, "cursor": 24}, "d800971251057eb8")},
    "sft": {0: ([[357, 37], [132, 249]], {"epoch": 1, "cursor": 40}, "54cb1adae696bf59"),
            1: ([[197, 397], [452, 449]], {"epoch": 1, "cursor": 40}, "2b41b4d9e122ed56")},
    "packed": {0: ([[[107, 159], [111, 185]], [[118, 148], [42, 164]]], {"epoch": 1, "cursor": 68}, "4e38a35e93f6516d"),
               1: ([[[167, 129], [51, 125]], [[137, 69], [47, 189]]], {"epoch": 1, "cursor": 68}, "ba98abc590d024ec")},
}
