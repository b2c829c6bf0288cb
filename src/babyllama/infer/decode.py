"""Make a model faster at token-by-token decoding on the CPU, without changing its results.

Decoding one sequence multiplies every weight matrix by a single vector, so it is bound by how fast
the weights stream from memory. Measured on our 2-core test machine with the 64,794 x 512 LM head:
`nn.Linear` (BLAS matrix-vector, weight stored (out, in)) 12.4 ms, about 10 GB/s; the same product
with the weight stored transposed 5.1 ms; a `torch.compile`d row-wise multiply-and-sum, which the
compiler turns into one vectorised, multi-threaded pass over the rows, 2.6 ms. `prepare_for_decoding`
swaps every projection and the LM head for a `DecodeLinear` that takes the fastest path available:

    one row, compiler available   compiled row dot products over the (out, in) weight (no copy)
    one row, no compiler          x @ W.T with W stored transposed (a copy, made once)
    several rows (prefill, batch) the ordinary matrix product

The arithmetic is the same (tokens are equal, tested). The prepared model is for inference only:
its projections hold buffers, not parameters.

What is left after the products is per-token overhead: some 100 small eager operations (norms,
rotary, cache writes, attention) cost ~4 ms a token on the 58.5M model. For models of
`COMPILE_STEP_MIN_PARAMS` or more, `DecodeSession` therefore runs each one-token step as one
`torch.compile`d graph: the KV cache takes the position as a tensor, so every step has the same
shapes and one graph serves the whole generation (the cache length is rounded up to a power of
two, at least 256, so a few graphs serve every length). Measured on the same machine, 58.5M model,
batch 1: 81 -> 103 tokens/s. Compiling costs ~9 s the first time; later processes load the compiled
code from the on-disk cache (their first generation, compile included, took 4 s).
On a GPU the graph is also captured as a CUDA graph (`mode="reduce-overhead"`), which removes the
kernel launch cost that dominates a small model there.
"""

from __future__ import annotations

import shutil
import warnings

import torch
import torch.nn as nn

from babyllama.model.kv_cache import KVCache

_ROW_DOT = None  # the compiled kernel, built on first use; False once compiling has failed


def _row_dot():
    global _ROW_DOT
    if _ROW_DOT is None:
        _ROW_DOT = torch.compile(lambda x, w: (x * w).sum(-1), dynamic=False)
    return _ROW_DOT


def compiler_available() -> bool:
    """torch.compile on the CPU writes C++ and needs a compiler on PATH."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "cl"))


class DecodeLinear(nn.Module):
    """y = x @ W.T, fast for a single row (see the module docstring)."""

    MIN_COMPILED = 1 << 18  # smaller matrices sit in cache, where BLAS is as fast and has no call overhead

    def __init__(self, weight: torch.Tensor, compiled: bool):
        super().__init__()
        self.compiled = compiled and weight.numel() >= self.MIN_COMPILED
        # compiled: keep (out, in), shared with the source when it is the tied embedding
        self.register_buffer("weight", weight.detach() if self.compiled else weight.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as 2-D rows: matmul on a sliced 3-D input would broadcast the weight into a slow bmm
        rows = x.reshape(-1, x.shape[-1])
        return self._rows(rows).reshape(*x.shape[:-1], -1)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        w_t = self.weight.t() if self.compiled else self.weight  # (in, out) view either way
        if rows.shape[0] != 1 or not self.compiled:
            return rows @ w_t
        if torch.compiler.is_compiling():  # inside a compiled decode step: inline the row dot products
            return (rows * self.weight).sum(-1)[None]
        global _ROW_DOT
        if _ROW_DOT is not False:
            try:
                return _row_dot()(rows, self.weight)[None]
            except Exception:  # no working toolchain after all: plain matrix product from now on
                _ROW_DOT = False
        return rows @ w_t


COMPILE_STEP_MIN_PARAMS = 8_000_000  # below this a compile (seconds) costs more than it saves on a reply


@torch.no_grad()
def prepare_for_decoding(model: nn.Module, compiled: bool | None = None, compile_step: bool | None = None) -> nn.Module:
    """In place; returns the model in eval mode. `compiled=None` uses the compiled kernels when a
    C++ compiler is on PATH (on a GPU: always). `compile_step=None` compiles the one-token step of
    models with at least COMPILE_STEP_MIN_PARAMS parameters. On GPUs the weights stay as they are."""
    if getattr(model, "_prepared_for_decoding", False):
        return model
    weight = next(model.parameters())
    on_cpu = weight.device.type == "cpu"
    compiled = (compiler_available() or not on_cpu) if compiled is None else compiled
    if compile_step is None:
        compile_step = compiled and sum(p.numel() for p in model.parameters()) >= COMPILE_STEP_MIN_PARAMS
    model.eval()
    object.__setattr__(model, "_compile_decode_step", bool(compile_step))
    if not on_cpu:
        object.__setattr__(model, "_prepared_for_decoding", True)
        return model
    head = DecodeLinear(model.output_weight, compiled)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError("prepare_for_decoding expects bias-free projections (the Llama here has none)")
                setattr(module, name, DecodeLinear(child.weight, compiled))
    # an instance attribute shadows Llama.logits; the model class itself stays untouched
    object.__setattr__(model, "logits", head)
    object.__setattr__(model, "_prepared_for_decoding", True)
    return model


def _one_token(model: nn.Module, cache: KVCache, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model(ids[:, None], cache=cache, start_pos=pos, last_only=True)[:, -1]


_COMPILED_STEPS: dict[str, object] = {}  # torch.compile mode -> the compiled _one_token


def _compiled_one_token(mode: str | None):
    if mode not in _COMPILED_STEPS:
        _COMPILED_STEPS[mode] = torch.compile(_one_token, dynamic=False, mode=mode)
    return _COMPILED_STEPS[mode]


class DecodeSession:
    """One generation: its KV cache, the prompt pass, then one token at a time.

        session = DecodeSession(model, batch_size=1, length=len(prompt) + max_new_tokens)
        logits = session.prefill(prompt)              # (batch, vocab) after the prompt
        logits = session.step(next_ids, position)     # (batch, vocab) after one more token

    The step is compiled when `prepare_for_decoding` chose so; otherwise (and if compiling fails,
    with a warning) it is the plain model call. Both give the same tokens (tested).

    A compiled session hands its cache back to the model on `close()`, and the next session of the
    same shape reuses it: no fresh allocation per reply, and on a GPU the CUDA graph keeps its
    addresses. Positions past the one being decoded are masked, so what an earlier reply left there
    is never read. Sessions that run at the same time each get their own cache.
    """

    def __init__(self, model: nn.Module, batch_size: int, length: int):
        self.model = model
        self.compiled = getattr(model, "_compile_decode_step", False)
        if not self.compiled:
            self.cache = model.new_cache(batch_size, length)
            self.device, self.mode = self.cache.keys[0].device, None
            return
        # fixed shapes per graph: round the length up so few graphs serve all lengths
        self.key = (batch_size, min(max(256, 1 << (length - 1).bit_length()), model.config.max_seq_len))
        spare = model.__dict__.pop("_spare_decode_cache", None)
        reused = spare is not None and spare[0] == self.key
        self.cache = spare[1] if reused else model.new_cache(*self.key)
        self.device = self.cache.keys[0].device
        self.mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on GPUs
        if self.mode and not reused:
            for t in self.cache.keys + self.cache.values:  # updated in place: CUDA graphs need fixed addresses
                torch._dynamo.mark_static_address(t)

    def close(self) -> None:
        if self.compiled:
            object.__setattr__(self.model, "_spare_decode_cache", (self.key, self.cache))

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.model(prompt, cache=self.cache, start_pos=0, last_only=True)[:, -1]

    def step(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        if self.compiled:
            try:
                pos = torch.tensor(position, device=self.device)
                logits = _compiled_one_token(self.mode)(self.model, self.cache, ids, pos)
                return logits.clone() if self.mode else logits  # a CUDA graph reuses its output memory
            except Exception as err:  # e.g. no working compiler after all: correct, slower, from now on
                warnings.warn(f"compiled decoding failed ({type(err).__name__}: {err}); decoding eagerly")
                self.compiled = False
                object.__setattr__(self.model, "_compile_decode_step", False)
        return self.model(ids[:, None], cache=self.cache, start_pos=position, last_only=True)[:, -1]
