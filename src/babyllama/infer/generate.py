"""Autoregressive generation with a preallocated KV cache, streamed token by token."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from babyllama.infer.decode import DecodeSession
from babyllama.infer.sampling import SamplingConfig, sample_next


@torch.no_grad()
def generate_tokens(model, prompt: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None,
                    eos_id: int | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token ids (batch,) one step at a time.

    prompt: (batch, length) ids, equal lengths. Stops at max_new_tokens, when every row has produced
    `eos_id`, or when the context window is full. `use_cache=False` recomputes the whole prefix each
    step; it exists to check the cache (both must give the same tokens).
    """
    sampling = sampling or SamplingConfig()
    model.eval()
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    limit = model.config.max_seq_len
    if prompt.shape[1] >= limit:
        raise ValueError(f"prompt has {prompt.shape[1]} tokens; the model's context is {limit}")
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


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, sampling: SamplingConfig | None = None,
                  on_text: Callable[[str], None] | None = None, stop_at_eos: bool = True) -> str:
    """Continue `prompt`. The prompt is preceded by EOS, the document boundary the model saw in
    pretraining, so it reads as the start of a new document."""
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    return stream_text(model, tokenizer, ids, max_new_tokens, sampling,
                       (tokenizer.eos_id,) if stop_at_eos else (), on_text)


def load_for_inference(path: str | Path, device: str = "auto", for_decoding: bool = True,
                       compile_step: bool | None = None):
    """(model, tokenizer, checkpoint dir) from a run directory or a checkpoint directory.
    `for_decoding` lays the weights out for fast generation (infer/decode.py); pass False to get
    the plain, trainable model. `compile_step`: see `prepare_for_decoding` (None: by model size)."""
    from babyllama.infer.decode import prepare_for_decoding
    from babyllama.tokenizer import load_tokenizer
    from babyllama.train.checkpoint import load_model
    from babyllama.train.runtime import pick_device

    model, ckpt = load_model(path, pick_device(device))
    if for_decoding:
        prepare_for_decoding(model, compile_step=compile_step)
    for candidate in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer", Path(path) / "tokenizer"):
        if candidate.is_dir():
            return model, load_tokenizer(candidate), ckpt
    raise FileNotFoundError(f"{path}: no tokenizer/ directory next to the checkpoint")
