"""Choosing the next token: repetition penalty, temperature, top-k, top-p, then a real random draw.

Defaults are chosen for small models, which otherwise loop: a mild repetition penalty (1.1),
temperature 0.8, top-k 50, top-p 0.9. temperature=0 means greedy decoding.

Settings are checked when a `SamplingConfig` is made (a ConfigError naming the flag), and
`sample_next` returns valid token ids for any logits a model can produce: huge values, -inf, NaN
(treated as -inf), half precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from babyllama.config import ConfigError


def _number(flag: str, value, rule: str, ok) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (isinstance(value, int) or math.isfinite(value)) and ok(value)):  # ints: no float overflow
        raise ConfigError(f"{flag} must be {rule}, got {value!r}")


@dataclass
class SamplingConfig:
    """Each field is checked on creation; the messages name the command-line flag."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 disables
    top_p: float = 0.9  # 1.0 disables
    repetition_penalty: float = 1.1  # 1.0 disables; >1 discourages tokens already in the context
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _number("--temperature", self.temperature, "a finite number >= 0 (0 = greedy)", lambda v: v >= 0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"--top-k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        _number("--top-p", self.top_p, "in (0, 1] (1 disables; for greedy decoding use --temperature 0)",
                lambda v: 0 < v <= 1)
        _number("--repetition-penalty", self.repetition_penalty, "a finite number > 0 (1 disables)", lambda v: v > 0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ConfigError(f"--seed must be an integer in [0, 2**64), got {self.seed!r}")


MAX_NEW_TOKENS = 200  # tokens per reply unless asked otherwise: the Engine, chat and the CLI (cli/flags.py)


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits, multiply negative ones, of every token seen in `context`."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = logits.gather(1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def penalize_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """`apply_repetition_penalty` for a batch whose rows each keep a (vocab,) mask of the tokens
    seen so far and their own penalty (batch,): the same numbers, without re-reading the context."""
    p = penalty[:, None].to(logits.dtype)
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability adds up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already reach p; the most likely token always stays
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop_sorted[:, 0] = False  # also when p is below float32's smallest number and rounds to 0
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _sanitize(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen), +inf -> the largest float (chosen, without NaN in the softmax)."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, context: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> next token ids (batch,).

    Works for any logits: the row maximum is moved to 0 before the temperature divides, so the
    most likely token always keeps probability > 0 and the filters never remove every token; a
    row without any usable logit (all -inf or NaN) is drawn from uniformly."""
    logits = logits.float()
    if context is not None:
        logits = apply_repetition_penalty(logits, context, cfg.repetition_penalty)
    logits = _sanitize(logits)
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    top = logits.amax(dim=-1, keepdim=True)
    hopeless = torch.isneginf(top)
    if bool(hopeless.any()):  # no finite logit in a row: every token of it equally likely
        logits = torch.where(hopeless, torch.zeros_like(logits), logits)
        top = torch.where(hopeless, torch.zeros_like(top), top)
    # <= 0 with a 0 in every row, so the best token keeps probability > 0 at any temperature; the
    # temperature is held to float32's normal range, where 0 / t stays 0 and -inf / t stays -inf
    finfo = torch.finfo(torch.float32)
    scaled = (logits - top) / min(max(cfg.temperature, finfo.tiny), finfo.max)
    if 0 < cfg.top_k < scaled.shape[-1]:
        # only the k best can be drawn: top-p and the draw among those k (sorting 64k logits per row
        # for top-p cost more than the model's step at batch 32). Ties at the k-th value: k are kept.
        values, index = torch.topk(scaled, cfg.top_k, dim=-1)
        probs = filter_top_p(values, cfg.top_p).softmax(dim=-1)
        return index.gather(1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)
    probs = filter_top_p(scaled, cfg.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
