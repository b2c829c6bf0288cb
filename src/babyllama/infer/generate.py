"""Helpers of generation: streaming text, fitting prompts into the context, loading a model to
generate with. The generating itself is the Engine's (infer/engine.py)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import torch

from babyllama.infer.sampling import SamplingConfig, check_max_new_tokens


def generate_tokens(model, prompt: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None,
                    eos_id: int | None = None, use_cache: bool = True,
                    compile_step: bool | None = None) -> Iterator[torch.Tensor]:
    """The tensor form of `Engine.stream` for equal-length prompts: yield the next ids (batch,)
    one step at a time; a row that has produced `eos_id` yields `eos_id` from then on."""
    from babyllama.infer.engine import Engine

    engine = Engine(model, compile_step=compile_step)
    fill = eos_id if eos_id is not None else 0
    for step in engine.stream(prompt.tolist(), max_new_tokens, sampling,
                              (eos_id,) if eos_id is not None else (), use_cache=use_cache):
        yield torch.tensor([fill if t is None else t for t in step], device=engine.device)


class TextStreamer:
    """Turns a growing list of ids into newly printable text (holds back half a UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a byte-fallback character is not complete yet
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.printed = text[self.printed:], len(text)
        return new


def reply_room(max_seq_len: int, max_new_tokens: int) -> int:
    """Tokens of the context kept free for the reply: max_new_tokens, but at most half the window."""
    return max(1, min(max_new_tokens, max_seq_len // 2))


def prompt_cut_warning(what: str, length: int, limit: int, reserve: int, dropped: int, detail: str = "") -> str:
    return (f"{what} is {length} tokens; the context holds {limit}, {reserve} of them kept for the reply: "
            f"the earliest {dropped} tokens{detail} were dropped")


def fit_prompt(ids: list[int], limit: int, max_new_tokens: int, keep_first: int = 0) -> list[int]:
    """`ids` cut to leave reply_room() tokens of the `limit`-token context: the earliest tokens go
    (after the first `keep_first`, e.g. a document boundary), with a warning saying how many."""
    check_max_new_tokens(max_new_tokens)
    reserve = reply_room(limit, max_new_tokens)
    budget = limit - reserve
    if len(ids) <= budget:
        return ids
    keep_first = min(keep_first, budget - 1)
    kept = ids[:keep_first] + ids[len(ids) - (budget - keep_first):]
    warnings.warn(prompt_cut_warning("prompt", len(ids) - keep_first, limit, reserve, len(ids) - len(kept)),
                  stacklevel=3)
    return kept


def load_for_inference(path: str | Path, device: str = "auto", for_decoding: bool = True,
                       allow_unverified: bool = False, dtype: str = "float32", merge: bool = True, rope=None):
    """(model, tokenizer, checkpoint dir) from a run directory or a checkpoint directory.
    `for_decoding` lays the weights out for fast generation (infer/decode.py); pass False to get
    the plain, trainable model (`Engine.load` is the usual way in for generating).
    `allow_unverified` accepts a checkpoint without checksums.json (one not written by babyllama).
    `dtype`: the weights' precision (float32, bfloat16, float16, or auto: see `runtime.inference_dtype`).
    An adapter run (LoRA/DoRA) loads over its base; `merge` folds the adapter into the weights
    (the same outputs at the cost of a plain model; False keeps the adapter modules).
    `rope` (config.RopeScaling) replaces the checkpoint's RoPE scaling (a longer context)."""
    from babyllama.checkpoint import load_model
    from babyllama.infer.decode import prepare_for_decoding
    from babyllama.runtime import inference_dtype, pick_device
    from babyllama.tokenizer import load_tokenizer

    device = pick_device(device)
    model, ckpt = load_model(path, device, allow_unverified=allow_unverified, merge=merge, rope=rope)
    model.to(inference_dtype(dtype, device))
    if for_decoding:
        prepare_for_decoding(model)
    for candidate in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer", Path(path) / "tokenizer"):
        if candidate.is_dir():
            return model, load_tokenizer(candidate), ckpt
    raise FileNotFoundError(f"{path}: no tokenizer/ directory next to the checkpoint")
