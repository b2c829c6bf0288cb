"""Where and how to run: device, precision, CPU allocator, threads, peak FLOPs for MFU."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import time
import warnings

import torch

from babyllama.config import DEVICE_SYNTAX, ConfigError

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common GPUs, for MFU.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def pick_device(name: str = "auto") -> torch.device:
    """auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps; a device this machine (or this
    torch build) does not have is a ConfigError saying why."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or not DEVICE_SYNTAX.fullmatch(name):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                why = f"this torch, {torch.__version__}, is a CPU build: install a CUDA build of torch to use a GPU"
            else:
                why = f"this torch is built for CUDA {torch.version.cuda}, but no GPU or driver answers"
            raise ConfigError(f"--device {name}: CUDA is not available here ({why}); use --device cpu")
        count = torch.cuda.device_count()
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                              f"({have})")
        return torch.device(name)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            raise ConfigError("--device mps: Apple's MPS backend is not available here (it needs macOS on Apple "
                              "silicon and a torch built with MPS); use --device cpu")
        return torch.device(name)
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags the kernel reports for the first CPU (empty off Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls run
    ~2.5x faster than float32; elsewhere they are emulated and ~100x slower."""
    cpu = getattr(torch._C, "_cpu", None)  # older torch builds expose probes; 2.13 has none
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on GPUs that have it, fp16 on older GPUs; on CPUs bf16 where the CPU has bf16
    units (a training step ~1.6x faster than float32), else float32 (emulated bf16 is ~100x slower)."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name != "auto":
        if name not in table:
            raise ConfigError(f"--dtype: unknown dtype {name!r} (auto, float32/fp32, bfloat16/bf16, float16/fp16)")
        if device.type == "cpu" and table[name] != torch.float32 and not cpu_has_fast_bf16():
            warnings.warn(f"--dtype {name} on a CPU without bf16 units: its matmuls are emulated, "
                          f"far slower than float32 (--dtype auto picks float32 here)", stacklevel=2)
        return table[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for generation. 'auto': bf16 on GPUs that have it (fp16 on older ones),
    float32 on CPUs: decoding there is bound by reading the weights, and the compiled float32
    kernels outrun bf16 on CPUs without bf16 units (`--dtype bfloat16` asks for it anyway)."""
    if name == "auto" and device.type != "cuda":
        return torch.float32
    return pick_dtype(name, device)


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


_allocator_tuned = False


def tune_cpu_allocator() -> None:
    """Keep freed memory in the process (glibc): training frees and re-allocates the same large
    activations every step, and returning them to the OS costs a page fault per 4 KB each time.
    On this 2-core machine it lifts training throughput by ~10-40%. No effect off glibc."""
    global _allocator_tuned
    if _allocator_tuned or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
        _allocator_tuned = True
    except OSError:
        pass


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s for MFU: a table for GPUs, a short matmul measurement on CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2  # tf32 at best
        return None
    if device.type == "cpu":
        n = 1024 if dtype == torch.float32 or cpu_has_fast_bf16() else 256  # emulated bf16 is slow
        g = torch.Generator().manual_seed(0)  # never touch the global RNG: resume must be exact
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        a @ b
        best = 0.0
        for _ in range(5):  # best of several short trials: a busy neighbour only lowers a trial
            t, reps = time.perf_counter(), 0
            while time.perf_counter() - t < 0.08:
                a @ b
                reps += 1
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
        return best
    return None
