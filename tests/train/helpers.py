import torch


class FixedBatches:
    """A batch source that replays given (tokens, targets) micro-batches in order, resumably."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def random_batches(n, batch, seq, vocab, seed=0, mask_some=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        y = torch.randint(0, vocab, (batch, seq), generator=g)
        if mask_some:  # uneven numbers of counted targets per row, as SFT will have
            cut = torch.randint(1, seq, (batch,), generator=g)
            y[torch.arange(seq)[None, :] < cut[:, None]] = -100
        out.append((x, y))
    return out
