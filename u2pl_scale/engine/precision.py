"""Mixed precision: autocast contexts (parameters stay fp32) and the fp16 grad scaler."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
