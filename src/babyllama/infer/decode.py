"""Make a model faster at token-by-token decoding on the CPU, without changing its results.

Decoding one sequence multiplies every weight matrix by a single vector, so it is bound by how fast
the weights stream from memory. Measured on our 2-core test machine with the 64,794 x 512 LM head:
`nn.Linear` (BLAS matrix-vector, weight stored (out, in)) 12.4 ms, about 10 GB/s; the same product
with the weight stored transposed 5.1 ms; a `torch.compile`d row-wise multiply-and-sum, which the
compiler turns into one vectorised, multi-threaded pass over the rows, 2.6 ms. The `DecodeLayout`
transformation swaps every projection and the LM head for a `DecodeLinear` that takes the fastest
path available:

    one row, compiler available   compiled row dot products over the (out, in) weight (no copy)
    one row, no compiler          x @ W.T with W stored transposed (a copy, made once)
    several rows (batch, prompt)  oneDNN's matrix product on its own reordered copy of the weight,
                                  made by `pack()` when the Engine first sees a batch (2.6x MKL's
                                  sgemm for the head at 8 rows); the ordinary product before that

The arithmetic is the same (tokens are equal, tested). The prepared model is for inference only:
its projections hold buffers, not parameters.

What is left after the products is per-token overhead: some 100 small eager operations (norms,
rotary, cache writes, attention) cost ~4 ms a token on the 58.5M model. For models of
`COMPILE_STEP_MIN_PARAMS` or more, `DecodeSession` (driven by the Engine, infer/engine.py) therefore runs each one-token step as one
`torch.compile`d graph: the KV cache takes the position as a tensor, so every step has the same
shapes and one graph serves the whole generation (the cache length is rounded up to a power of
two, at least 256, so a few graphs serve every length). Measured on the same machine, 58.5M model,
batch 1: 81 -> 103 tokens/s. Compiling costs ~9 s the first time; later processes load the compiled
code from the on-disk cache (their first generation, compile included, took 4 s).
On a GPU the graph is also captured as a CUDA graph (`mode="reduce-overhead"`), which removes the
kernel launch cost that dominates a small model there.
"""

from __future__ import annotations

import itertools
import shutil
import warnings
import weakref

import torch
import torch.nn as nn

from babyllama.model.kv_cache import KVCache
from babyllama.transforms import LAYOUT, applied, apply_transforms, register, replace_modules

_ROW_DOT = None  # the compiled kernel, built on first use; False once compiling has failed


def _row_dot():
    global _ROW_DOT
    if _ROW_DOT is None:
        _ROW_DOT = torch.compile(lambda x, w: (x * w).sum(-1), dynamic=False)
    return _ROW_DOT


def compiler_available() -> bool:
    """torch.compile on the CPU writes C++ and needs a compiler on PATH."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "cl"))


# oneDNN's reordered weights, by number. The compiled step cannot take them as inputs (inductor has
# no lowering for them), so it calls `packed_linear` with the number: an operator it does not look into.
_PACKED: dict[int, torch.Tensor] = {}
_next_packed = itertools.count()


@torch.library.custom_op("babyllama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    """x (rows, in) @ W.T with W the oneDNN weight number `index` (see DecodeLinear.pack)."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[index], None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The (out, in) weight reordered by oneDNN for its matrix product, or None where this torch has
    no oneDNN. Measured with 2 threads on a 2-core AVX2 EPYC, 64,794 x 512 LM head: 8 rows 17 ms
    (MKL's sgemm on the plain weight: 44 ms), a 256-row prompt 175 ms (313 ms)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 8)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


class DecodeLinear(nn.Module):
    """y = x @ W.T, fast for a single row and, once `pack()`ed, for a batch (module docstring)."""

    MIN_COMPILED = 1 << 18  # smaller matrices sit in cache, where BLAS is as fast and has no call overhead

    def __init__(self, weight: torch.Tensor, compiled: bool):
        super().__init__()
        self.compiled = compiled and weight.numel() >= self.MIN_COMPILED
        # compiled: keep (out, in), shared with the source when it is the tied embedding
        self.register_buffer("weight", weight.detach() if self.compiled else weight.detach().t().contiguous())
        self.packed: int | None = None  # the number of oneDNN's copy (in _PACKED), made by pack()

    def pack(self) -> None:
        """Add oneDNN's copy of the weight for products of several rows (batches, prompts). A copy:
        made only when batches are used, so one-sequence chat keeps its memory."""
        if self.packed is None and self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
            packed = _pack(self.weight if self.compiled else self.weight.t())
            if packed is not None:
                self.packed = next(_next_packed)
                _PACKED[self.packed] = packed
                weakref.finalize(self, _PACKED.pop, self.packed, None)  # freed with the module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as 2-D rows: matmul on a sliced 3-D input would broadcast the weight into a slow bmm
        rows = x.reshape(-1, x.shape[-1])
        return self._rows(rows).reshape(*x.shape[:-1], -1)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        w_t = self.weight.t() if self.compiled else self.weight  # (in, out) view either way
        if rows.shape[0] > 1:
            if self.packed is not None:
                return packed_linear(rows, self.packed, self.weight.shape[0 if self.compiled else 1])
            return rows @ w_t
        if not self.compiled:
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


def pack_for_batches(model: nn.Module) -> None:
    """Give every DecodeLinear its oneDNN copy (once): what the Engine does before its first batch."""
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            module.pack()


COMPILE_STEP_MIN_PARAMS = 8_000_000  # below this a compile (seconds) costs more than it saves on a reply


@register
class DecodeLayout:
    """The transformation that lays a model out for decoding (see the module docstring): every
    plain `nn.Linear`, the LM head included, becomes a `DecodeLinear`. Modules of other types (an
    adapter's wrapper, a quantized linear) are kept, and the plain linears inside them swapped.
    `compiled=None` uses the compiled kernels when a C++ compiler is on PATH. On GPUs the weights
    stay as they are. The result is for inference only: its projections hold buffers."""

    name, order, trains_own_params = "decode_layout", LAYOUT, False

    def __init__(self, compiled: bool | None = None):
        self.compiled = compiled

    def settings(self) -> dict:
        return {"compiled": self.compiled}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        model.eval()
        if next(model.parameters()).device.type != "cpu":
            return
        compiled = compiler_available() if self.compiled is None else self.compiled

        def swap(name: str, module: nn.Module):
            # CLEX's ODE and PPO's value head are no projections decoding runs
            if type(module) is not nn.Linear or name.startswith(("rope.", "value_head.")):
                return None
            if module.bias is not None:
                raise ValueError(f"{name}: the decoding layout expects bias-free projections (the Llama here has none)")
            return DecodeLinear(module.weight, compiled)

        replace_modules(model, swap)


def prepare_for_decoding(model: nn.Module, compiled: bool | None = None) -> nn.Module:
    """Apply `DecodeLayout` once (a second call changes nothing); returns the model in eval mode."""
    if not any(r["name"] == DecodeLayout.name for r in applied(model)):
        apply_transforms(model, [DecodeLayout(compiled)])
    return model.eval()


def should_compile_step(model: nn.Module, compile_step: bool | None = None) -> bool:
    """Whether to compile the one-token step: asked for explicitly, else for models of
    COMPILE_STEP_MIN_PARAMS parameters or more where the compiler works (a GPU, or a C++ compiler)."""
    rope = getattr(model, "rope", None)
    if rope is not None and rope.dynamic:  # its tables follow the length: no one graph for every step
        return False
    if compile_step is not None:
        return compile_step
    on_cpu = next(model.buffers(), next(model.parameters(), None)).device.type == "cpu"
    return (not on_cpu or compiler_available()) and model.config.num_params() >= COMPILE_STEP_MIN_PARAMS


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

    `pad` (batch,) left-pads rows of unequal length (see model/kv_cache.py). With `compiled`, each
    step is one compiled graph (if compiling fails: a warning, then the plain model call; both give
    the same tokens, tested). A compiled session takes its cache from `pool` (a dict the caller
    keeps, e.g. the Engine) and gives it back on `close()`: the next session of the same shape
    reuses it, with no fresh allocation per reply, and on a GPU the CUDA graph keeps its addresses.
    Slots past the one being decoded are masked, so what an earlier reply left there is never read.
    """

    def __init__(self, model: nn.Module, batch_size: int, length: int, compiled: bool = False,
                 pool: dict | None = None, pad: torch.Tensor | None = None):
        self.model, self.compiled, self.pool = model, compiled, pool
        if not compiled:
            self.cache = model.new_cache(batch_size, length)
            self.cache.set_padding(pad)
            self.device, self.mode = self.cache.keys[0].device, None
            return
        # fixed shapes per graph: round the length up so few graphs serve all lengths
        self.key = (batch_size, min(max(256, 1 << (length - 1).bit_length()), model.config.max_seq_len))
        spare = pool.pop(self.key, None) if pool is not None else None
        self.cache = spare if spare is not None else model.new_cache(*self.key)
        self.cache.set_padding(pad)
        self.device = self.cache.keys[0].device
        self.mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on GPUs
        if self.mode and spare is None:
            for t in self.cache.keys + self.cache.values:  # updated in place: CUDA graphs need fixed addresses
                torch._dynamo.mark_static_address(t)

    def close(self) -> None:
        if self.compiled and self.pool is not None:
            self.pool[self.key] = self.cache

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
        return self.model(ids[:, None], cache=self.cache, start_pos=position, last_only=True)[:, -1]
