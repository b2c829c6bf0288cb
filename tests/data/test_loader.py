import numpy as np
import pytest
import torch

from babyllama.data.loader import PretrainBatches, TokenWindows, validation_batches
from babyllama.data.pretrain import load_manifest
from babyllama.corpus.readers import DataError


def stream(data_dir, split="train"):
    m = load_manifest(data_dir)
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]])


def test_windows_are_contiguous_slices_and_targets_are_shifted(data_dir):
    tokens = stream(data_dir)
    batches = PretrainBatches(data_dir, seq_len=32, batch_size=4, seed=1)
    for _ in range(5):
        x, y = batches.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            full = np.concatenate([row_x, row_y[-1:]])
            starts = np.flatnonzero(tokens[: len(tokens) - 32] == full[0])
            assert any(np.array_equal(tokens[s:s + 33], full) for s in starts)  # never shuffled inside


def test_epoch_visits_every_window_once(data_dir):
    b = PretrainBatches(data_dir, seq_len=64, batch_size=4, seed=2)
    n = b.windows.num_windows
    epoch = np.concatenate([b.next_indices() for _ in range(b.batches_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch) == n - n % 4  # no repeats; only the ragged tail waits
    second = np.concatenate([b.next_indices() for _ in range(b.batches_per_epoch)])
    assert b.epoch == 1 and not np.array_equal(epoch, second)  # a new order each epoch


def test_resume_continues_the_same_sequence(data_dir):
    a = PretrainBatches(data_dir, 32, 4, seed=3)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]
    b = PretrainBatches(data_dir, 32, 4, seed=3)
    b.load_state_dict(state)
    for e in expected:
        assert torch.equal(b.next_batch()[0], e)


def test_ranks_split_each_global_batch_without_overlap(data_dir):
    single = PretrainBatches(data_dir, 32, 4, seed=4)
    ranks = [PretrainBatches(data_dir, 32, 2, seed=4, rank=r, world_size=2) for r in range(2)]
    def rows(x, y):  # whole rows, tokens with their own targets, in a canonical order
        return sorted(zip(map(tuple, x.tolist()), map(tuple, y.tolist())))

    for _ in range(3):
        whole = rows(*single.next_batch())
        parts = [r.next_batch() for r in ranks]
        assert rows(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])) == whole


def test_truncated_shard_is_detected(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(data_dir, copy)
    shard = copy / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        TokenWindows(copy, "train", 32)


def test_validation_batches_are_fixed(data_dir):
    a = validation_batches(data_dir, 32, 4, 3)
    b = validation_batches(data_dir, 32, 4, 3)
    assert len(a) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))


def test_ids_past_the_vocabulary_are_found_before_training(data_dir, tmp_path, monkeypatch):
    import shutil

    import babyllama.data.loader as loader
    from babyllama.data.loader import PretrainBatches
    from babyllama.corpus.readers import DataError

    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    shard = bad / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10:12] = b"\xff\xff"  # token 5: in the first window, which the shuffle may draw at any time
    shard.write_bytes(bytes(raw))
    vocab = 4096
    with pytest.raises(DataError, match=r"train-00000.bin: token [\d,]+ is id 65535, outside the model's vocabulary"):
        PretrainBatches(bad, 32, 4, vocab_limit=vocab)
    monkeypatch.setattr(loader, "SCAN_LIMIT_BYTES", 0)  # a large dataset: each batch checks itself
    batches = PretrainBatches(bad, 32, 4, vocab_limit=vocab)
    assert int(batches.windows.batch([1])[0].max()) < vocab  # good windows still read
    with pytest.raises(DataError, match=r"train-00000.bin: token 5 is id 65535"):
        batches.windows.batch([1, 0])
