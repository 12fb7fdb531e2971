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

import os
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


# U2PL_CPU_LOOPS_SINGLE_THREAD=1 runs the cache-sized CPU loops on one thread: better on a machine shared with
# other jobs; off by default since with passive OpenMP waiting all threads are faster on an idle machine.
CPU_LOOPS_SINGLE_THREAD = os.environ.get("U2PL_CPU_LOOPS_SINGLE_THREAD", "0") == "1"


@contextmanager
def cpu_single_thread(device: torch.device):
    """One intra-op thread for a loop of many small, cache-sized CPU ops. Each multi-threaded op ends at a
    barrier; on a loaded machine a descheduled worker makes every barrier cost up to a scheduler time slice, so
    hundreds of small parallel ops cost seconds instead of a fraction of one. No-op off CPU."""
    if not host_path(device) or not CPU_LOOPS_SINGLE_THREAD or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
