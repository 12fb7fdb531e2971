"""train.precision: auto resolves to bf16 only where the device runs bf16 natively (u2pl_scale/precision.py)."""
import platform
import warnings
from pathlib import Path

import pytest
import torch

from u2pl_scale import precision
from u2pl_scale.precision import native_bf16, resolve_precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_with_native_bf16_and_explicit_choices_are_kept(native, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for any of these
        assert resolve_precision("fp32", cpu) == "fp32"
        assert resolve_precision("fp16", cpu) == "fp16"
        assert resolve_precision("auto", cpu) in ("bf16", "fp32")
        if native:
            assert resolve_precision("bf16", cpu) == "bf16"
    if not native:  # an explicit bf16 is kept, with a warning that it is emulated
        with pytest.warns(RuntimeWarning, match="without native bf16"):
            assert resolve_precision("bf16", cpu) == "bf16"


def _x86_cpu_flags() -> set:
    text = Path("/proc/cpuinfo").read_text()
    return set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").exists(),
                    reason="reads x86 CPU flags from /proc/cpuinfo")
def test_native_bf16_on_this_cpu_follows_its_avx512_or_amx_flags():
    """oneDNN runs bf16 in hardware with AVX-512 (its avx512_core: avx512f/bw/vl/dq), AMX, or AVX2 with
    AVX-NE-CONVERT (its avx2_vnni_2); with plain AVX2 it emulates it (the demo's training step 26x slower than in
    fp32, benchmarks/RESULTS.md). The flags, read independently of torch."""
    flags = _x86_cpu_flags()
    hardware = ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags or "amx_bf16" in flags
                or {"avx2", "avx_ne_convert"} <= flags)
    assert native_bf16(torch.device("cpu")) == hardware, sorted(f for f in flags if "avx" in f or "amx" in f)
