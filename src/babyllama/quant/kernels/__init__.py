"""The low-bit matmul: y = x @ W^T with W packed at 2, 4 or 8 bits per weight, dequantized inside
the kernel group by group (lowbit.cpp, AVX2), so the float weights never exist in memory.

PyTorch's own weight-only kernels were measured first on this project's 2-core AVX2 machine
(2026-11-30, one (1 x 512) @ (512 x 2752) product): float32 211 us, `_weight_int8pack_mm` 1,270 us,
`_weight_int4pack_mm_for_cpu` 1,767 us, and a `torch.compile`d dequantize-then-matmul 3,400 us (it
materialises the weights). Ours took 135 us at 8 bits and 196 us at 4 bits there, and on the
512 x 64,793 LM head 3.5-3.7 ms against float32's 16-21 ms. So this kernel it is.

It is compiled on first use with PyTorch's C++ extension builder (g++ and ninja, about a minute,
cached under ~/.cache/torch_extensions). Where it cannot be built or run (no compiler, a CPU
without AVX2, an ARM Mac, a GPU tensor) the same product is computed by `dequantized_matmul`:
correct, slower, and it dequantizes a slice of rows at a time, never the whole matrix.
BABYLLAMA_QUANT_KERNEL=torch forces that path (tests compare the two).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

_KERNEL = None  # the compiled module, False once it failed, None before the first try
_ROWS_PER_SLICE = 4096  # rows dequantized at once by the fallback (a few MB of floats)


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build() or False
    return _KERNEL or None


def _build():
    if os.environ.get("BABYLLAMA_QUANT_KERNEL") == "torch":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not _built_before():
                print("babyllama: compiling the low-bit matmul kernel (once: about a minute)...", file=sys.stderr)
            module = load(name="babyllama_lowbit", sources=[str(Path(__file__).with_name("lowbit.cpp"))],
                          extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                          verbose=False)
        # its output's shape, for torch.compile (the operator itself is registered by loading the library)
        torch.library.register_fake("babyllama::lowbit_matmul")(
            lambda x, packed, scales, offsets, bits, group: x.new_empty(x.shape[0], packed.shape[0]))
        return module
    except Exception as e:  # no compiler, no ninja, a failed build: the slower path still works
        print(f"babyllama: the low-bit kernel could not be built ({str(e).splitlines()[0][:200]}); "
              f"quantized layers use the slower PyTorch path", file=sys.stderr)
        return None


def _built_before() -> bool:
    """Whether the kernel's library is in the build cache already (then loading it is instant)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: any failure means "do not know"

        return (Path(_get_build_directory("babyllama_lowbit", False)) / "babyllama_lowbit.so").is_file()
    except Exception:
        return False


def kernel_available() -> bool:
    return _kernel() is not None


def lowbit_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                  bits: int, group: int) -> torch.Tensor:
    """x (rows, in) float32 @ W^T with W[n, k] = code[n, k] * scales[n, g] + offsets[n, g] (g = k // group),
    codes packed `bits` (2, 4 or 8) to the byte: (rows, out) float32."""
    if _kernel() is not None and x.device.type == "cpu" and group % 32 == 0 and x.shape[1] % 32 == 0:
        return torch.ops.babyllama.lowbit_matmul(x, packed, scales, offsets, bits, group)
    return dequantized_matmul(x, packed, scales, offsets, bits, group)


def dequantize_rows(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int,
                    group: int) -> torch.Tensor:
    from babyllama.quant.pack import unpack

    codes = unpack(packed, bits).float()
    rows, cols = codes.shape
    w = codes.view(rows, cols // group, group) * scales[:, :, None] + offsets[:, :, None]
    return w.view(rows, cols)


def dequantized_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                       bits: int, group: int) -> torch.Tensor:
    """The portable path: dequantize a slice of output rows, multiply, next slice."""
    out = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype, device=x.device)
    for begin in range(0, packed.shape[0], _ROWS_PER_SLICE):
        end = begin + _ROWS_PER_SLICE
        w = dequantize_rows(packed[begin:end], scales[begin:end], offsets[begin:end], bits, group)
        out[:, begin:end] = x @ w.to(x.dtype).t()
    return out
