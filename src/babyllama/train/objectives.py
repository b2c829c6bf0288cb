"""What a training stage minimises: the one Trainer takes an objective, a stage is its objective and its data.

A batch is a tuple of tensors with the row dimension first (the Trainer's evaluation gives each rank
the rows `t[rank::world_size]` of every tensor). An objective answers four things about it:

- `count(batch)`: what the step's summed loss is normalised by (counted target tokens, pairs, weights...).
  Called on CPU before any forward; the Trainer sums it over all micro-batches of a step and over all
  ranks, and divides every micro-batch's summed loss by that total, so gradient accumulation and data
  parallelism compute exactly what one large batch would.
- `loss(model, batch)`: (summed loss, metrics) of one micro-batch whose tensors the Trainer has already
  moved to the device. The loss is a *sum* over the micro-batch (never a mean: see `count`). `metrics`
  are named scalar tensors, also sums over the micro-batch: the Trainer sums them over micro-batches and
  ranks and logs each divided by the step's count, as `NAME` in training records and `val_NAME` in
  evaluation records of metrics.jsonl (a name must not be one the loop logs itself: loss, lr, ...).
- `tokens(batch)`: tokens processed, for throughput (tok/s) and `tokens` in the records.
- `name`: shown in messages.

`model` is whatever the Trainer runs (DDP, FSDP, DeepSpeed or compiled wrappers around `Llama`; in
evaluation the bare model under torch.no_grad()): call it, never its other methods, or data parallelism
would not synchronise the gradients, and preferably once per micro-batch (put DPO's chosen and rejected
rows in one batch): DDP prepares its gradient reduction once per forward. Its calls:
`model(tokens, targets)` is the summed token loss (float32 scalar; targets -100 where no loss),
`model(tokens, targets, segments=segments)` the same for packed rows, and
`model(tokens, targets, reduction="none")` the per-token losses, (batch, seq) float32, 0 at -100: what
an objective over whole sequences (DPO, GRPO) builds its per-sequence log-probabilities from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from babyllama.config import IGNORE_INDEX

Batch = Sequence[torch.Tensor]


class Objective(ABC):
    """The interface the Trainer trains through (see the module docstring). Subclass it, or give any
    object with the same four members."""

    name: str = "objective"

    @abstractmethod
    def count(self, batch: Batch) -> float:
        """What this micro-batch adds to the step's normaliser (usually an int: tokens, pairs)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss, {name: summed metric}) of one micro-batch already on the device."""

    def tokens(self, batch: Batch) -> int:
        return batch[0].numel()


class TargetTokens(Objective):
    """Cross-entropy on every target that is not -100, normalised by the number of such targets.
    Batches: (tokens, targets), or (tokens, targets, segments) where `packed` (several sequences per
    row, kept apart by the model)."""

    name = "target_tokens"
    packed = True

    def count(self, batch: Batch) -> int:
        if len(batch) not in ((2, 3) if self.packed else (2,)):
            shape = "(tokens, targets) or (tokens, targets, segments)" if self.packed else "(tokens, targets)"
            raise ValueError(f"the {self.name} objective trains on batches of {shape}, got {len(batch)} tensors")
        return int((batch[1] != IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, targets, *segments = batch
        return (model(tokens, targets, segments=segments[0]) if segments else model(tokens, targets)), {}


class NextToken(TargetTokens):
    """Pretraining: predict every next token of (tokens, targets) windows."""

    name = "next_token"
    packed = False


class AssistantTokens(TargetTokens):
    """SFT: the same loss on the assistant's tokens only (the chat template sets the rest to -100);
    padded (tokens, targets) rows or packed (tokens, targets, segments) rows."""

    name = "assistant_tokens"
    packed = True
