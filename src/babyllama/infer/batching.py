"""Continuous batching: generations that arrive at any time share one decoding step.

The Engine's `stream` decodes a batch that starts and ends together. A server cannot wait for that:
requests come and go one by one. Here a worker thread keeps a set of running rows and, step after
step, (1) admits waiting requests: each prompt runs alone through the model (prefill) and its keys
and values are copied into a free row of a shared cache; (2) samples every row's next token from
its own logits, with its own settings, seed and repetition penalty; (3) retires the rows that
finished (a stop token, their token budget, the context full) or whose client went away; (4) runs
one forward pass of one token for all rows that remain. A request joins at the next step and a
finished one frees its row at once; nobody waits for the longest reply of a batch.

Rows have their own lengths, so the cache (`RowCache`) writes each row's new key at its own slot
and masks each row's unwritten slots; the model only sees a cache that says where each row's
positions are (the same interface as the left-padded KVCache). Running rows stay packed at the
front (a leaving row's slot takes the last row's contents), so the step works on a view, never a
copy. Steps run eagerly: the batch changes shape from step to step, which a compiled graph cannot.

    batcher = Batcher(engine.model, max_batch=8)
    request = batcher.submit(prompt_ids, max_new_tokens=64, sampling=SamplingConfig(), stop_ids={eos},
                             on_token=lambda tid: ..., on_finish=lambda reason: ...)
    request.cancel()      # a client went away: its row is freed at the next step
    batcher.close()
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from babyllama.config import ConfigError
from babyllama.infer.decode import pack_for_batches
from babyllama.infer.sampling import SamplingConfig, check_max_new_tokens, penalize_seen, sample_next


class QueueFull(RuntimeError):
    """More requests are waiting than the batcher accepts (the server answers 503)."""


class RowCache:
    """Keys and values of up to `capacity` rows of their own lengths (`lens`); rows 0..rows-1 run."""

    def __init__(self, model, capacity: int):
        cfg = model.config
        probe = next(model.buffers(), next(model.parameters(), None))
        dtype = model.norm.weight.dtype
        shape = (capacity, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=probe.device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=probe.device) for _ in range(cfg.n_layers)]
        self.lens = torch.zeros(capacity, dtype=torch.long, device=probe.device)
        self.rows = 0
        self.span = 0  # slots the running rows use, plus the one this step writes
        self.rope_inv_freq = None
        self.pad = self.lens  # not None: the model reads each row's positions from `positions`

    def positions(self, start_pos, new: int) -> torch.Tensor:
        return self.lens[:self.rows, None] + torch.arange(new, device=self.lens.device)

    def update(self, layer: int, start_pos, k: torch.Tensor, v: torch.Tensor):
        """Write each row's one new key and value at its own length; what each may see is its own."""
        n, slots = self.rows, self.lens[:self.rows]
        rows = torch.arange(n, device=slots.device)
        self.keys[layer][rows, :, slots] = k[:, :, 0]
        self.values[layer][rows, :, slots] = v[:, :, 0]
        visible = torch.arange(self.span, device=slots.device)[None, :] <= slots[:, None]
        return self.keys[layer][:n, :, :self.span], self.values[layer][:n, :, :self.span], visible[:, None, None, :]

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> int:
        """Put a prefilled prompt's keys and values (per layer: (kv_heads, length, head_dim)) in the next row."""
        row = self.rows
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.keys[layer][row, :, :length] = k
            self.values[layer][row, :, :length] = v
        self.lens[row] = length
        self.rows += 1
        return row

    def remove(self, row: int) -> None:
        """Free `row`; the last running row moves into it (its contents up to its length)."""
        last = self.rows - 1
        if row != last:
            n = int(self.lens[last])
            for layer in range(len(self.keys)):
                self.keys[layer][row, :, :n] = self.keys[layer][last, :, :n]
                self.values[layer][row, :, :n] = self.values[layer][last, :, :n]
            self.lens[row] = self.lens[last]
        self.rows -= 1


@dataclass
class Request:
    """One generation in the batcher. `on_token(id)` and `on_finish(reason)` are called from the
    worker thread; reason is "stop" (a stop id, not passed to on_token), "length" (budget or
    context), "cancelled" or "error: ...". A stop id is not given to `on_token`."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: frozenset
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    produced: int = 0
    cancelled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self.cancelled = True


class Batcher:
    """The worker thread and its queue (module docstring): `max_batch` rows decode together and
    `max_queue` more requests may wait for a row; beyond that `submit` raises QueueFull."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64):
        if model.rope.dynamic:
            raise ConfigError(f"RoPE scaling {model.config.rope_scaling!r} changes with each row's length, which "
                              f"rows decoding together cannot share; serve a model with a static scaling")
        self.model, self.max_batch, self.max_queue = model.eval(), max_batch, max_queue
        self.context = model.config.max_seq_len
        self.cache = RowCache(model, max_batch)
        self.running: list[Request] = []  # request of each cache row, in row order
        self.logits: torch.Tensor | None = None  # (rows, vocab): what each running row samples next from
        self.seen = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.bool, device=self.cache.lens.device)
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.closed = False
        self.steps = 0
        self.admitting = 0  # taken from the queue, not running yet (their prompts are being read)
        if max_batch > 1:
            pack_for_batches(model)
        self.thread = threading.Thread(target=self._run, name="babyllama-batcher", daemon=True)
        self.thread.start()

    # --- the caller's side ----------------------------------------------------------------------------

    def submit(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, stop_ids,
               on_token: Callable[[int], None], on_finish: Callable[[str], None]) -> Request:
        if not prompt:
            raise ConfigError("the prompt is empty: generation needs at least one token to start from")
        if len(prompt) >= self.context:
            raise ConfigError(f"the prompt has {len(prompt)} tokens; the model's context is {self.context}")
        check_max_new_tokens(max_new_tokens)
        sampling.validate()
        request = Request(list(prompt), max_new_tokens, sampling, frozenset(stop_ids), on_token, on_finish)
        if sampling.seed is not None:
            request.generator = torch.Generator(device=self.cache.lens.device).manual_seed(sampling.seed)
        with self.lock:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            free_rows = max(0, self.max_batch - len(self.running) - self.admitting)  # joining at the next step
            if len(self.waiting) >= self.max_queue + free_rows:
                raise QueueFull(f"{len(self.running)} requests are running and {len(self.waiting)} waiting")
            self.waiting.append(request)
            self.lock.notify()
        return request

    def load(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "steps": self.steps}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # --- the worker ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.waiting and not self.running:
                    self.lock.wait()
                if self.closed:
                    break
                joining = []
                while self.waiting and len(self.running) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
                self.admitting = len(joining)
            try:
                with torch.no_grad():
                    self._admit(joining)
                    self.admitting = 0
                    if self.running:
                        self._step()
            except Exception as err:  # a bug must not take the server down with it: fail the rows, go on
                self.admitting = 0
                hit = self.running + [r for r in joining if r not in self.running and not r.cancelled]
                for request in hit:
                    self._finish(request, f"error: {type(err).__name__}: {err}")
                while self.running:
                    self.cache.remove(len(self.running) - 1)
                    self.running.pop()
                self.logits = None
        for request in list(self.running) + list(self.waiting):
            request.on_finish("cancelled")

    def _admit(self, requests: list[Request]) -> None:
        """Read the joining prompts in one forward pass (left-padded) and give each a row."""
        for r in requests:
            if r.cancelled:  # its client left while it waited
                self._finish(r, "cancelled")
        requests = [r for r in requests if not r.cancelled]
        if not requests:
            return
        device = self.cache.lens.device
        longest = max(len(r.prompt) for r in requests)
        pad = torch.tensor([longest - len(r.prompt) for r in requests])
        tokens = torch.zeros(len(requests), longest, dtype=torch.long)
        for i, r in enumerate(requests):
            tokens[i, int(pad[i]):] = torch.tensor(r.prompt)
        cache = self.model.new_cache(len(requests), longest)
        cache.set_padding(pad)
        logits = self.model(tokens.to(device), cache=cache, start_pos=0, last_only=True)[:, -1]
        for i, r in enumerate(requests):
            begin = int(pad[i])
            row = self.cache.add([k[i, :, begin:] for k in cache.keys], [v[i, :, begin:] for v in cache.values],
                                 len(r.prompt))
            self.running.append(r)
            self.seen[row] = False
            self.seen[row, torch.tensor(r.prompt, device=device)] = True
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def _step(self) -> None:
        rows = len(self.running)
        samplings = [r.sampling for r in self.running]
        logits = self.logits
        penalties = torch.tensor([s.repetition_penalty for s in samplings], device=logits.device)
        if bool((penalties != 1.0).any()):
            logits = penalize_seen(logits.float(), self.seen[:rows], penalties)
        next_ids = self._sample(logits, samplings, [r.generator for r in self.running])
        leaving = []
        for row, (request, tid) in enumerate(zip(self.running, next_ids.tolist())):
            if request.cancelled:
                leaving.append((row, "cancelled"))
                continue
            if tid in request.stop_ids:
                leaving.append((row, "stop"))
                continue
            request.produced += 1
            request.on_token(tid)
            full = int(self.cache.lens[row]) + 1 >= self.context  # no slot left for this token's key
            if request.produced >= request.max_new_tokens or full:
                leaving.append((row, "length"))
        self.seen[torch.arange(rows), next_ids] = True
        order = list(range(rows))  # which of this step's rows each cache row holds after the retiring
        for row, reason in sorted(leaving, reverse=True):  # from the back: the row moved in never leaves now
            request = self.running[row]
            self._retire(row)  # first: a caller told it finished sees its row free
            self._finish(request, reason)
            order[row] = order[-1]
            order.pop()
        self.steps += 1
        if not self.running:
            self.logits = None
            return
        ids = next_ids[torch.tensor(order, dtype=torch.long, device=next_ids.device)]
        self.cache.span = int(self.cache.lens[:self.cache.rows].max()) + 1
        self.logits = self.model(ids[:, None], cache=self.cache, start_pos=torch.tensor(0), last_only=True)[:, -1]
        self.cache.lens[:self.cache.rows] += 1

    def _retire(self, row: int) -> None:
        """Free the cache row of a finished request; the last row moves into its place."""
        last = len(self.running) - 1
        self.cache.remove(row)
        self.seen[row] = self.seen[last]
        self.running[row] = self.running[last]
        self.running.pop()

    def _finish(self, request: Request, reason: str) -> None:
        try:
            request.on_finish(reason)
        except Exception:  # a callback's failure is the caller's; the batch goes on
            pass

    @staticmethod
    def _sample(logits: torch.Tensor, samplings: list[SamplingConfig], generators: list) -> torch.Tensor:
        if all(s.temperature <= 0 for s in samplings):
            return sample_next(logits, samplings[0])
        first = samplings[0]
        if all(g is None for g in generators) and all(
                (s.temperature, s.top_k, s.top_p) == (first.temperature, first.top_k, first.top_p) for s in samplings):
            return sample_next(logits, first)  # unseeded rows alike: one draw for the batch
        return torch.cat([sample_next(logits[i:i + 1], s, generator=g)
                          for i, (s, g) in enumerate(zip(samplings, generators))])
