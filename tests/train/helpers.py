import os
import subprocess
import sys
from pathlib import Path

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


REPO_ROOT = Path(__file__).resolve().parents[2]


def torchrun_module(module: str, args: list[str], nproc: int = 2, timeout: float = 900):
    """`python -m torch.distributed.run --standalone -m MODULE ARGS` from the repository root (so
    `tests.*` imports), on CPU threads of their own; a lost rendezvous race is retried once.
    The timeout only guards against a hang: on a fresh clone the first DeepSpeed run JIT-compiles
    its CPU Adam op, which took over 300 s on 2 busy cores (measured)."""
    from tests.train.test_distributed import TRANSIENT_LAUNCH_ERRORS

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    for _ in range(2):
        res = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        if res.returncode == 0 or not any(m in res.stderr for m in TRANSIENT_LAUNCH_ERRORS):
            break
    first = max(res.stderr.find("Traceback"), 0)  # a rank's own error, before the launcher's summary
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[first:first + 4000] + res.stderr[-1500:]
    return res
