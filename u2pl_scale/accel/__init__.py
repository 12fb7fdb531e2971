"""Accelerations: other implementations of the method's stages (u2pl_scale/method/stages.py), each with the
reference's results, chosen once per run by `select` from the device and the config.

- cpu.py: torch ops shaped for a CPU in eager mode (host reads, cache-sized loops, reused buffers: buffers.py);
- cuda.py: Triton kernels (triton_kernels.py) where eager GPU code pays for issuing many small ops;
- CUDA-graph capture of the method (train.compile_method_mode=cuda-graph) is engine/graphed.py's.
"""
from __future__ import annotations

import os

import torch

from ..method.stages import REFERENCE, Stages

IMPLEMENTATIONS = ("auto", "reference")


def select(device, compiled: bool = False, implementation: str = "auto") -> Stages:
    """The stages for a run on `device`: with "auto", the CPU stages for eager CPU code, the CUDA stages on CUDA,
    the reference elsewhere and for traced CPU code; "reference" everywhere with "reference". Reads
    U2PL_CPU_LOOPS_SINGLE_THREAD=1 (the CPU stages' loops on one thread, for a CPU shared with other jobs)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"method implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    device = torch.device(device)
    if implementation == "reference":
        return REFERENCE
    if device.type == "cpu" and not compiled:
        from .cpu import cpu_stages

        return cpu_stages(single_thread_loops=os.environ.get("U2PL_CPU_LOOPS_SINGLE_THREAD", "0") == "1")
    if device.type == "cuda":
        from .cuda import cuda_stages

        return cuda_stages(compiled)
    return REFERENCE
