"""Scalar heads, transformations like LoRA, so the model class stays a language model.

`ScalarHead` replaces the LM head: the model then scores a sequence (a reward model).
`ValueHead` adds one beside it: PPO's value estimates from the policy's own final states.

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


class ValueTap(nn.Module):
    """value = linear(final normed state), taken at every position by a forward hook on the model's
    final norm while the model is in training mode (in eval mode, generation, it does nothing).
    A hook and not a new output, so the model's forward is unchanged: `model(tokens, targets,
    reduction="none")` gives the policy's token losses, and the same call leaves the values here
    for `take()`. The values come out of the one forward call, so DDP sees the head used in it."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(dim, 1, device=device, dtype=dtype)
        nn.init.zeros_(self.linear.weight)  # values start at 0: the first steps' value loss leaves
        nn.init.zeros_(self.linear.bias)  # the shared trunk, and so the policy, nearly untouched
        self.values = None

    def record(self, norm: nn.Module, inputs, output) -> None:
        if self.training:
            self.values = self.linear(output).squeeze(-1).float()

    def take(self):
        """The values (batch, seq) of the last training-mode forward; an error when there was none."""
        values, self.values = self.values, None
        if values is None:
            raise RuntimeError("no values recorded: call the model (in training mode) before take()")
        return values


@register
class ValueHead:
    name, order, trains_own_params = "value_head", HEAD, False

    def settings(self) -> dict:
        return {}

    def apply(self, model: nn.Module) -> None:
        w = model.norm.weight
        model.value_head = ValueTap(model.config.dim, device=w.device, dtype=w.dtype)
        model.norm.register_forward_hook(model.value_head.record)


def value_tap(model: nn.Module) -> ValueTap:
    """The value head of `model`, found through any wrapper (DDP, torch.compile)."""
    for module in model.modules():
        if isinstance(module, ValueTap):
            return module
    raise ValueError("this model has no value head (apply adapters.heads.ValueHead)")
