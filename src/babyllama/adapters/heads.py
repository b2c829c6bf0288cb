"""A scalar head in place of the LM head: the model then scores a sequence (a reward model; PPO's
value model next). A transformation like LoRA, so the model class stays a language model.

`ScalarHead` swaps `model.output` (dim -> vocab) for a bias-free `nn.Linear(dim, 1)`; `model(tokens)`
then returns (batch, seq, 1), a score at every position, and a sequence's score is read at its last
token. The new head is the model's own (never tied to the embedding), so the config says
`tie_embeddings = False` and checkpoints store it as `output.weight` (1 x dim).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from babyllama.transforms import HEAD, register


@register
class ScalarHead:
    name, order, trains_own_params = "scalar_head", HEAD, False

    def settings(self) -> dict:
        return {}

    def apply(self, model: nn.Module) -> None:
        old = model.output
        head = nn.Linear(model.config.dim, 1, bias=False, device=old.weight.device, dtype=old.weight.dtype)
        nn.init.normal_(head.weight, std=model.config.dim ** -0.5)  # scores of order one from normed states
        model.output = head
        model.config = dataclasses.replace(model.config, tie_embeddings=False)


def is_scorer(model: nn.Module) -> bool:
    """True for a model whose head gives one score per position."""
    from babyllama.transforms import applied

    return any(r["name"] == ScalarHead.name for r in applied(model))
