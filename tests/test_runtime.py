"""Device and precision choice: bf16 on CPUs only where they multiply bf16 in hardware."""

import warnings

import pytest
import torch

from babyllama import runtime

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma {extra}\n\nprocessor\t: 1\n"


def _cpuinfo(tmp_path, extra: str) -> str:
    path = tmp_path / f"cpuinfo_{extra or 'plain'}"
    path.write_text(CPUINFO.format(extra=extra))
    return str(path)


def test_bf16_units_are_read_from_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(torch._C, "_cpu", None, raising=False)  # no torch probes: the flags decide
    runtime.cpu_has_fast_bf16.cache_clear()
    try:
        assert runtime.cpu_has_fast_bf16(_cpuinfo(tmp_path, "avx512f avx512_bf16"))
        assert runtime.cpu_has_fast_bf16(_cpuinfo(tmp_path, "amx_tile amx_bf16"))
        assert not runtime.cpu_has_fast_bf16(_cpuinfo(tmp_path, "avx512f avx512bw"))
        assert not runtime.cpu_has_fast_bf16(str(tmp_path / "missing"))
    finally:
        runtime.cpu_has_fast_bf16.cache_clear()


def test_auto_dtype_on_cpu_follows_the_bf16_units(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.pick_dtype("auto", cpu) == torch.bfloat16
    assert runtime.pick_dtype("float32", cpu) == torch.float32  # an explicit choice is kept


def test_an_explicit_half_dtype_on_a_cpu_without_bf16_units_warns(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="--dtype bf16 on a CPU without bf16 units"):
        assert runtime.pick_dtype("bf16", cpu) == torch.bfloat16  # obeyed, with the cost named
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.pick_dtype("bf16", cpu) == torch.bfloat16
        assert runtime.pick_dtype("float32", cpu) == torch.float32


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        runtime.pick_dtype("fp8", torch.device("cpu"))
