"""Mixed precision: autocast contexts (parameters stay fp32), the fp16 grad scaler, and `train.precision: auto`."""
from __future__ import annotations

import contextlib
import warnings

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 convolutions and matmuls in hardware. A CUDA GPU from Ampere on; a CPU where
    oneDNN has bf16 kernels (x86 with AVX-512, AMX or AVX-NE-CONVERT, ARM with its bf16 extension). On an AVX2-only
    x86 CPU oneDNN emulates bf16, many times slower than fp32 (benchmarks/cpu_precision.py measures it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other accelerators: bf16 is their native mixed precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: `auto` is bf16 where the device runs it natively (native_bf16), else fp32. An
    explicit bf16 is kept, with a warning where it is emulated."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(f"train.precision=bf16 on a {device.type} without native bf16: it is emulated, and on an "
                      "AVX2-only CPU many times slower than fp32 (26x for the demo's step); train.precision=auto "
                      "picks fp32 there",
                      RuntimeWarning, stacklevel=2)
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A scaler that is active only for fp16 (bf16 keeps fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def configure_cudnn(device: torch.device, benchmark: bool) -> None:
    """train.cudnn_benchmark: cuDNN autotuning of each convolution shape on a GPU (no effect on a CPU)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark
