"""What every batch source shares: a shuffled order per epoch, walked one global batch at a time.

The order of epoch e is drawn from a generator seeded with (seed, e), so (epoch, cursor) is the whole
state: saving it and restoring it resumes exactly. A global batch is `batch_size * world_size`
consecutive entries of the order; rank r takes entries r, r + world_size, ... of it. An order that
has fewer entries left than a global batch is dropped, and the next epoch's order begins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ShuffledBatches(ABC):
    """Subclasses set `num_items` (what the permutation is drawn over) before calling __init__, and
    define `make_batch(entries)`; they may override `arrange(order, generator)` to turn the shuffled
    item indices into the epoch's order (grouped by length, packed into rows, ...), drawing any further
    randomness from the same generator."""

    num_items: int

    def __init__(self, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self._order) // self.global_batch

    def _permutation(self, epoch: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.arrange(torch.randperm(self.num_items, generator=g), g)

    def arrange(self, order, generator):
        """The epoch's order from a shuffled tensor of item indices: by default that order itself."""
        return order.numpy()

    def next_indices(self):
        """This rank's entries of the next global batch (a new epoch's order when one runs out)."""
        if self.cursor + self.global_batch > len(self._order):  # drop the ragged tail
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        share = self._order[self.cursor:self.cursor + self.global_batch][self.rank::self.world_size]
        self.cursor += self.global_batch
        return share

    @abstractmethod
    def make_batch(self, entries):
        """The batch (tensors) of this rank's chosen entries."""

    def next_batch(self):
        return self.make_batch(self.next_indices())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
