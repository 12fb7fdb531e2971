"""Reused CPU buffers for the CPU stages' large per-step tensors (accel/cpu.py).

torch has no caching allocator on CPU: every large tensor is a fresh mmap that page-faults (and is zeroed by the
kernel) on first touch, so a step that allocates the unsupervised loss's saved gradient (B x C x crop x crop) and
the feature-map gradient of the anchor gather (B x D x h x w) pays for hundreds of MB of page faults and fills
each time, a large share of the method's work at the VOC shapes.

A buffer here is handed out again only when nothing but this pool references its storage (no tensor, view or
autograd graph still holds it), so reuse is invisible to callers: a result that outlives its step, or a second
call before the first result is released, simply gets a fresh buffer. Accelerators need none of this: their caching
allocators already reuse memory.

The pool is owned by the CPU stages' `BufferPool` object (one per `accel.cpu.cpu_stages()`), not by the process.
"""
from __future__ import annotations

import torch


def _use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


_UNSHARED = _use_count(torch.empty(1))  # the tensor itself plus the temporary storage wrapper


class BufferPool:
    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._dirty_rows: dict[tuple, tuple] = {}  # (num_rows, dim, rows written) since the buffer was last zero

    def _acquire(self, key: tuple, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """A flat CPU buffer of at least `numel` elements owned by nobody else; True if it was reused."""
        buffer = self._buffers.get(key)
        if buffer is not None and buffer.numel() >= numel and _use_count(buffer) <= _UNSHARED:
            return buffer, True
        if buffer is not None and buffer.numel() >= numel:  # still referenced: leave it to its holder
            numel = buffer.numel()
        buffer = torch.empty(numel, dtype=dtype)
        self._buffers[key] = buffer
        return buffer, False

    def empty(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Like torch.empty(shape) on CPU (contiguous, contents undefined), from the pool."""
        numel = 1
        for size in shape:
            numel *= size
        buffer, _ = self._acquire((name, dtype), numel, dtype)
        self._dirty_rows.pop((name, dtype), None)
        return buffer[:numel].view(shape)

    def scatter_rows(self, name: str, num_rows: int, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """zeros([num_rows, D]).index_add_(0, index, rows) without filling num_rows x D zeros every call: a reused
        buffer only has the rows written by its previous use zeroed again."""
        dim = rows.shape[1]
        key = (name, rows.dtype)
        flat, reused = self._acquire(key, num_rows * dim, rows.dtype)
        out = flat[: num_rows * dim].view(num_rows, dim)
        dirty = self._dirty_rows.get(key)
        if reused and dirty is not None and dirty[:2] == (num_rows, dim):
            out.index_fill_(0, dirty[2], 0)
        else:
            out.zero_()
        self._dirty_rows[key] = (num_rows, dim, index.clone())
        return out.index_add_(0, index, rows)
