"""Rewards for RL: a Python function `(prompt, completion) -> float`, or a trained reward model.

`--reward-fn MODULE:FUNC` names any importable function (a module path or a .py file); the rule
rewards below are ready to use, e.g. `--reward-fn babyllama.align.rewards:no_repetition`.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from babyllama.config import ConfigError

RewardFn = Callable[[str, str], float]


def no_repetition(prompt: str, completion: str) -> float:
    """1 minus the share of the completion's character 4-grams that repeat an earlier one (looping: 0)."""
    from babyllama.eval.generation import repeated_ngram_rate

    return 1.0 - repeated_ngram_rate([completion], 4) if len(completion) >= 4 else 0.0


def ends_in_punctuation(prompt: str, completion: str) -> float:
    """1 if the completion ends a sentence (。！？!?.), else 0: a finished answer, not a cut one."""
    return 1.0 if completion.rstrip().endswith(("。", "！", "？", "!", "?", ".")) else 0.0


def tidy_answer(prompt: str, completion: str) -> float:
    """The demo's house format: no looping, a finished sentence, between 12 and 120 characters (a
    lower bound, so that stopping at once is not the easy way out of looping)."""
    size = 1.0 if 12 <= len(completion) <= 120 else 0.0
    return (no_repetition(prompt, completion) + ends_in_punctuation(prompt, completion) + size) / 3


def load_reward_fn(spec: str) -> RewardFn:
    """`module.path:function` or `path/to/file.py:function`."""
    if ":" not in spec:
        raise ConfigError(f"--reward-fn must be MODULE:FUNCTION (e.g. babyllama.align.rewards:no_repetition), "
                          f"got {spec!r}")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"--reward-fn: no file {path}")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"--reward-fn: cannot import {where} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward-fn: {where} has no function {name!r}")
    return fn


class ModelReward:
    """A trained reward model (`babyllama reward train`) as a reward: scores prompt + completion at
    the completion's closing marker. Called with whole batches by the rollout."""

    def __init__(self, run: str, device="cpu", allow_unverified: bool = False):
        from babyllama.adapters.heads import is_scorer
        from babyllama.checkpoint import load_model

        self.model, ckpt = load_model(run, device, allow_unverified=allow_unverified)
        if not is_scorer(self.model):
            raise ConfigError(f"--reward {run}: {ckpt} is not a reward model (train one with `babyllama reward train`)")
        self.model.requires_grad_(False)

    def score(self, sequences: list[list[int]], pad_id: int) -> list[float]:
        import torch

        width = max(len(s) for s in sequences)
        tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        for row, ids in enumerate(sequences):
            tokens[row, :len(ids)] = torch.tensor(ids)
        last = torch.tensor([len(s) - 1 for s in sequences])
        with torch.no_grad():
            scores = self.model(tokens.to(next(self.model.parameters()).device)).float().squeeze(-1)
        return scores[torch.arange(len(sequences)), last.to(scores.device)].tolist()
