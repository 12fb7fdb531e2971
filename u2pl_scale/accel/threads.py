"""One intra-op thread for the CPU stages' loops of many small, cache-sized ops, where the machine is shared."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def single_thread(enabled: bool):
    """One intra-op thread inside this block if `enabled`. Each multi-threaded op ends at a barrier; on a loaded
    machine a descheduled worker makes every barrier cost up to a scheduler time slice, so hundreds of small
    parallel ops cost seconds instead of a fraction of one. Off by default (accel.select): with passive OpenMP
    waiting all threads are faster on an idle machine."""
    if not enabled or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
