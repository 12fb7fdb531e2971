"""Which code path a method function takes on a device.

On CPU the method has host paths: loops over cache-sized blocks, reused scratch buffers, thread-count switches
and exact queue pushes that read counts back. In eager mode they are the fastest there, but they read values
back to the host or keep Python-side state, so they would sync an accelerator and cannot be compiled. Everywhere
else (accelerators, the "meta" device the tests trace the device path on, and code being traced by torch.compile,
on CPU too) the method takes its device path: static shapes and no host reads.
"""
from __future__ import annotations

import torch


def host_path(device: torch.device) -> bool:
    """True where the CPU host path is taken: a CPU tensor in eager mode."""
    return device.type == "cpu" and not torch.compiler.is_compiling()
