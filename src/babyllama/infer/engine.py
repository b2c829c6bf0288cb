"""The one inference engine: a model, its tokenizer and chat template, and the KV caches it reuses.

Everything that generates goes through it: `babyllama generate` and `chat`, the demo, evaluation and
RL rollouts; the server loads through it and decodes with its continuous batcher (infer/batching.py).

    engine = Engine.load("runs/sft")                           # or Engine(model, tokenizer)
    engine.complete("今天天气", max_new_tokens=50)               # continue a text
    engine.reply([Message("user", "你好")])                      # the assistant's next turn
    engine.generate([[5, 9, 2], [7]], max_new_tokens=20)        # ids in, ids out, a batch
    for step in engine.stream(prompts, ...): ...                # one token per unfinished row

A batch may hold prompts of unequal length: they are left-padded into one KV cache, each row with
its own positions and its padding masked out (model/kv_cache.py), so a row gets the tokens it would
get alone (greedy: tested). Each row has its own sampling settings, stop ids and token budget, and
stops on its own; the batch runs while any row is unfinished. The one-token step is compiled for
larger models and the weights are laid out for decoding (infer/decode.py): that is the fast path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from babyllama.config import ConfigError
from babyllama.infer.decode import DecodeSession, pack_for_batches, should_compile_step
from babyllama.infer.generate import TextStreamer, fit_prompt, reply_room
from babyllama.infer.sampling import MAX_NEW_TOKENS, SamplingConfig, check_max_new_tokens, penalize_seen, sample_next

RowText = Callable[[int, str], None]  # (row, newly printable text)


def _per_row(value, rows: int, what: str) -> list:
    """One value for every row, or a list with one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise ConfigError(f"{what}: {len(value)} values for {rows} prompts")
        return list(value)
    return [value] * rows


def _stop_sets(stop_ids, rows: int) -> list[frozenset]:
    """Stop ids for every row (a sequence of ints), or one sequence per row."""
    items = list(stop_ids)
    if items and not isinstance(items[0], int):
        return [frozenset(s) for s in _per_row(items, rows, "stop_ids")]
    return [frozenset(items)] * rows


class Engine:
    def __init__(self, model, tokenizer=None, compile_step: bool | None = None):
        """`model` as loaded (Engine.load lays it out for decoding); `compile_step`: compile the
        one-token step (None: for models of 8M+ parameters, where a compiler works)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.compile_step = should_compile_step(model, compile_step)
        self.device = next(model.buffers()).device
        self._template = None
        self._caches: dict = {}  # spare KV caches by shape, reused by the compiled step

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto", compile_step: bool | None = None,
             allow_unverified: bool = False, rope=None) -> "Engine":
        """From a run directory (its newest good checkpoint) or a checkpoint directory; `rope`
        (config.RopeScaling) replaces its RoPE scaling."""
        from babyllama.infer.generate import load_for_inference

        model, tokenizer, _ = load_for_inference(path, device, for_decoding=True, allow_unverified=allow_unverified,
                                                 dtype=dtype, rope=rope)
        return cls(model, tokenizer, compile_step)

    @property
    def template(self):
        if self._template is None:
            from babyllama.tokenizer.chat import ChatTemplate

            if self.tokenizer is None:
                raise ConfigError("chat needs a tokenizer: build the Engine with one")
            self._template = ChatTemplate(self.tokenizer)
        return self._template

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    # --- ids -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | list[int] = MAX_NEW_TOKENS,
               sampling: SamplingConfig | list[SamplingConfig] | None = None,
               stop_ids: Sequence[int] | list[Sequence[int]] = (), use_cache: bool = True
               ) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of every row (None once a row has finished).

        A row finishes after yielding one of its `stop_ids`, after its `max_new_tokens`, or when the
        batch's context is full (the longest prompt plus the new tokens fill `max_seq_len`).
        `use_cache=False` recomputes the whole prefix each step (equal-length prompts only); it
        exists to check the cache: both give the same tokens.
        """
        rows = len(prompts)
        if rows == 0:
            raise ConfigError("no prompts to generate from")
        budgets = _per_row(max_new_tokens, rows, "max_new_tokens")
        samplings = [s or SamplingConfig() for s in _per_row(sampling, rows, "sampling")]
        stops = _stop_sets(stop_ids, rows)
        for budget in budgets:
            check_max_new_tokens(budget)
        for s in samplings:
            s.validate()  # again: a field may have been changed since it was made
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        if min(lengths) == 0:
            raise ConfigError("a prompt is empty: generation needs at least one token to start from")
        if longest >= self.context:
            raise ConfigError(f"prompt has {longest} tokens; the model's context is {self.context}")
        budgets = [min(b, self.context - longest) for b in budgets]
        steps = max(budgets)
        pad = torch.tensor([longest - n for n in lengths])
        if not use_cache and bool(pad.any()):
            raise ValueError("use_cache=False needs prompts of equal length")
        tokens = torch.zeros(rows, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        tokens = tokens.to(self.device)
        vocab = self.model.config.vocab_size
        seen = None  # (rows, vocab): the tokens each row's repetition penalty applies to
        if any(s.repetition_penalty != 1.0 for s in samplings):
            seen = torch.zeros(rows, vocab, dtype=torch.bool, device=self.device)
            real = torch.arange(longest, device=self.device)[None, :] >= pad.to(self.device)[:, None]
            seen.scatter_(1, tokens, real)  # padding does not count as seen
        penalties = torch.tensor([s.repetition_penalty for s in samplings], device=self.device)
        generators = [torch.Generator(device=self.device).manual_seed(s.seed) if s.seed is not None else None
                      for s in samplings]
        if rows > 1:
            pack_for_batches(self.model)  # once: the layout for several rows
        finished = [False] * rows
        produced = [0] * rows
        session = DecodeSession(self.model, rows, longest + steps, self.compile_step, self._caches, pad) \
            if use_cache else None
        try:
            logits = session.prefill(tokens) if session else self.model(tokens, last_only=True)[:, -1]
            for step in range(steps):
                if seen is not None:
                    logits = penalize_seen(logits.float(), seen, penalties)
                next_ids = self._sample(logits, samplings, generators)
                ids = next_ids.tolist()
                out: list[int | None] = []
                for i, tid in enumerate(ids):
                    if finished[i]:
                        out.append(None)
                        continue
                    out.append(tid)
                    produced[i] += 1
                    finished[i] = tid in stops[i] or produced[i] >= budgets[i]
                yield out
                if all(finished) or step == steps - 1:
                    return
                if seen is not None:
                    seen.scatter_(1, next_ids[:, None], True)
                if session:
                    logits = session.step(next_ids, longest + step)
                else:
                    tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
                    logits = self.model(tokens, last_only=True)[:, -1]
        finally:  # also when the caller stops early: the cache goes back for the next generation
            if session:
                session.close()
                if self.compile_step and not session.compiled:  # compiling failed: not tried again
                    self.compile_step = False

    @staticmethod
    def _sample(logits: torch.Tensor, samplings: list[SamplingConfig], generators: list) -> torch.Tensor:
        greedy = [s.temperature <= 0 for s in samplings]
        if all(greedy):  # one argmax for the whole batch
            return sample_next(logits, samplings[0])
        first = samplings[0]
        if all(g is None for g in generators) and all(
                (s.temperature, s.top_k, s.top_p) == (first.temperature, first.top_k, first.top_p) for s in samplings):
            # unseeded rows alike: one draw for the batch (per-row draws cost ~2x on small models)
            return sample_next(logits, first)
        return torch.cat([sample_next(logits[i:i + 1], s, generator=g)
                          for i, (s, g) in enumerate(zip(samplings, generators))])

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | list[int] = MAX_NEW_TOKENS,
                 sampling: SamplingConfig | list[SamplingConfig] | None = None,
                 stop_ids: Sequence[int] | list[Sequence[int]] = ()) -> list[list[int]]:
        """The new ids of each row (a stop id that ended a row is not included)."""
        stops = _stop_sets(stop_ids, len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens, sampling, stop_ids):
            for i, tid in enumerate(step):
                if tid is not None and tid not in stops[i]:
                    out[i].append(tid)
        return out

    # --- text ----------------------------------------------------------------------------------------

    def _texts(self, prompts: list[list[int]], max_new_tokens: int, sampling, stop_ids: tuple[int, ...],
               on_text: RowText | None) -> list[str]:
        streamers = [TextStreamer(self.tokenizer) for _ in prompts]
        pieces: list[list[str]] = [[] for _ in prompts]

        def emit(row: int, text: str) -> None:
            if text:
                pieces[row].append(text)
                if on_text:
                    on_text(row, text)

        stops = frozenset(stop_ids)
        for step in self.stream(prompts, max_new_tokens, sampling, stop_ids):
            for row, tid in enumerate(step):
                if tid is not None and tid not in stops:
                    emit(row, streamers[row].push(tid))
        for row, streamer in enumerate(streamers):
            emit(row, streamer.flush())
        return ["".join(p) for p in pieces]

    def _complete_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        """EOS (the document boundary pretraining saw) + the prompt, cut to leave room for the reply."""
        tok = self.tokenizer
        return fit_prompt([tok.eos_id] + tok.encode(prompt), self.context, max_new_tokens, keep_first=1)

    def complete(self, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS, sampling: SamplingConfig | None = None,
                 on_text: Callable[[str], None] | None = None, stop_at_eos: bool = True) -> str:
        """Continue `prompt` as the start of a new document, streaming whole characters to `on_text`.
        A prompt too long for the context, with room for the reply (`reply_room`), loses its
        earliest tokens with a warning."""
        return self.complete_batch([prompt], max_new_tokens, sampling, stop_at_eos=stop_at_eos,
                                   on_text=(lambda row, text: on_text(text)) if on_text else None)[0]

    def complete_batch(self, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, sampling=None,
                       on_text: RowText | None = None, stop_at_eos: bool = True) -> list[str]:
        check_max_new_tokens(max_new_tokens)
        ids = [self._complete_ids(p, max_new_tokens) for p in prompts]
        return self._texts(ids, max_new_tokens, sampling, (self.tokenizer.eos_id,) if stop_at_eos else (), on_text)

    def reply(self, messages, max_new_tokens: int = MAX_NEW_TOKENS, sampling: SamplingConfig | None = None,
              on_text: Callable[[str], None] | None = None) -> str:
        """The assistant's next turn after `messages`, stopping at <|im_end|>. The reply gets at most
        half the context; a conversation too long for the rest is cut by `fit_chat_prompt`."""
        return self.reply_batch([messages], max_new_tokens, sampling,
                                on_text=(lambda row, text: on_text(text)) if on_text else None)[0]

    def reply_batch(self, conversations: list, max_new_tokens: int = MAX_NEW_TOKENS, sampling=None,
                    on_text: RowText | None = None) -> list[str]:
        from babyllama.infer.chat import fit_chat_prompt

        check_max_new_tokens(max_new_tokens)
        template = self.template
        ids = [fit_chat_prompt(template, messages, self.context, max_new_tokens) for messages in conversations]
        return self._texts(ids, reply_room(self.context, max_new_tokens), sampling,
                           (template.end_id, self.tokenizer.eos_id), on_text)
