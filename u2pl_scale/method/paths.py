"""Which code path a method function takes on a device.

On CPU the method has host paths: loops over cache-sized blocks, reused scratch buffers, thread-count switches
and exact queue pushes that read counts back. In eager mode they are the fastest there, but they read values
back to the host or keep Python-side state, so they would sync an accelerator and cannot be compiled. Everywhere
else (accelerators, the "meta" device the tests trace the device path on, and code being traced by torch.compile,
on CPU too) the method takes its device path: static shapes and no host reads.

`device_path_on_cpu()` makes eager CPU code take the device path too: the tests compare the two paths with it, and
`benchmarks/method_overhead.py --host-cost` times the device path's per-op host cost (what an accelerator's host
pays per step in eager mode) without an accelerator.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_STATE = threading.local()


def host_path(device: torch.device) -> bool:
    """True where the CPU host path is taken: a CPU tensor in eager mode, outside `device_path_on_cpu()`."""
    return device.type == "cpu" and not torch.compiler.is_compiling() and not getattr(_STATE, "device_path", False)


@contextmanager
def device_path_on_cpu():
    """Within this block (this thread), eager CPU code takes the device path, as a GPU runs it."""
    previous = getattr(_STATE, "device_path", False)
    _STATE.device_path = True
    try:
        yield
    finally:
        _STATE.device_path = previous
