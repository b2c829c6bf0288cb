"""Autoregressive generation with a preallocated KV cache, streamed token by token."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch

from babyllama.config import ConfigError
from babyllama.infer.decode import DecodeSession
from babyllama.infer.sampling import SamplingConfig, check_max_new_tokens, sample_next


@torch.no_grad()
def generate_tokens(model, prompt: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None,
                    eos_id: int | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token ids (batch,) one step at a time.

    prompt: (batch, length) ids, equal lengths, shorter than the context (`fit_prompt` cuts a longer
    one). Stops at max_new_tokens, when every row has produced `eos_id`, or when the context window
    is full. `use_cache=False` recomputes the whole prefix each step; it exists to check the cache
    (both must give the same tokens).
    """
    check_max_new_tokens(max_new_tokens)
    sampling = sampling or SamplingConfig()
    sampling.validate()  # again: a field may have been changed since it was made
    model.eval()
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    limit = model.config.max_seq_len
    if prompt.shape[1] == 0:
        raise ConfigError("the prompt is empty: generation needs at least one token to start from")
    if prompt.shape[1] >= limit:
        raise ConfigError(f"prompt has {prompt.shape[1]} tokens; the model's context is {limit}")
    max_new_tokens = min(max_new_tokens, limit - prompt.shape[1])
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
    session = DecodeSession(model, prompt.shape[0], prompt.shape[1] + max_new_tokens) if use_cache else None
    try:
        logits = session.prefill(prompt) if session else model(prompt, last_only=True)[:, -1]
        for _ in range(max_new_tokens):
            next_ids = sample_next(logits, sampling, context=tokens, generator=generator)
            if eos_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
                finished |= next_ids == eos_id
            yield next_ids
            if eos_id is not None and bool(finished.all()):
                return
            pos = tokens.shape[1]
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            if pos + 1 >= prompt.shape[1] + max_new_tokens:
                return
            logits = session.step(next_ids, pos) if session else model(tokens, last_only=True)[:, -1]
    finally:  # also when the caller stops early (a stop token): the cache goes back for the next reply
        if session:
            session.close()


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


def stream_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None,
                stop_ids: tuple[int, ...] = (), on_text: Callable[[str], None] | None = None) -> str:
    """Generate after `prompt_ids` until a stop id (not included); stream whole characters to on_text."""
    check_max_new_tokens(max_new_tokens)
    streamer = TextStreamer(tokenizer)
    pieces = []
    eos = stop_ids[0] if stop_ids else None
    for next_ids in generate_tokens(model, torch.tensor([prompt_ids]), max_new_tokens, sampling, eos_id=eos):
        tid = int(next_ids[0])
        if tid in stop_ids:
            break
        pieces.append(streamer.push(tid))
        if on_text and pieces[-1]:
            on_text(pieces[-1])
    pieces.append(streamer.flush())
    if on_text and pieces[-1]:
        on_text(pieces[-1])
    return "".join(pieces)


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


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, sampling: SamplingConfig | None = None,
                  on_text: Callable[[str], None] | None = None, stop_at_eos: bool = True) -> str:
    """Continue `prompt`. The prompt is preceded by EOS, the document boundary the model saw in
    pretraining, so it reads as the start of a new document. A prompt too long for the context,
    with room for the reply (see `reply_room`), loses its earliest tokens with a warning."""
    check_max_new_tokens(max_new_tokens)
    ids = fit_prompt([tokenizer.eos_id] + tokenizer.encode(prompt), model.config.max_seq_len, max_new_tokens,
                     keep_first=1)
    return stream_text(model, tokenizer, ids, max_new_tokens, sampling,
                       (tokenizer.eos_id,) if stop_at_eos else (), on_text)


def load_for_inference(path: str | Path, device: str = "auto", for_decoding: bool = True,
                       compile_step: bool | None = None, allow_unverified: bool = False, dtype: str = "float32"):
    """(model, tokenizer, checkpoint dir) from a run directory or a checkpoint directory.
    `for_decoding` lays the weights out for fast generation (infer/decode.py); pass False to get
    the plain, trainable model. `compile_step`: see `prepare_for_decoding` (None: by model size).
    `allow_unverified` accepts a checkpoint without checksums.json (one not written by babyllama).
    `dtype`: the weights' precision (float32, bfloat16, float16, or auto: see `runtime.inference_dtype`)."""
    from babyllama.checkpoint import load_model
    from babyllama.infer.decode import prepare_for_decoding
    from babyllama.runtime import inference_dtype, pick_device
    from babyllama.tokenizer import load_tokenizer

    device = pick_device(device)
    model, ckpt = load_model(path, device, allow_unverified=allow_unverified)
    model.to(inference_dtype(dtype, device))
    if for_decoding:
        prepare_for_decoding(model, compile_step=compile_step)
    for candidate in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer", Path(path) / "tokenizer"):
        if candidate.is_dir():
            return model, load_tokenizer(candidate), ckpt
    raise FileNotFoundError(f"{path}: no tokenizer/ directory next to the checkpoint")
