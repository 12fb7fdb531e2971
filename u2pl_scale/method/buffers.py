"""Reused CPU buffers for the method's large per-step tensors.

torch has no caching allocator on CPU: every large tensor is a fresh mmap that page-faults (and is zeroed by the
kernel) on first touch, so a step that allocates the unsupervised loss's saved gradient (B x C x crop x crop) and
the feature-map gradient of the anchor gather (B x D x h x w) pays for hundreds of MB of page faults and fills
each time, a large share of the method's work at the VOC shapes.

A buffer here is handed out again only when nothing but this pool references its storage (no tensor, view or
autograd graph still holds it), so reuse is invisible to callers: a result that outlives its step, or a second
call before the first result is released, simply gets a fresh buffer. Off CPU these return fresh tensors (the
caching allocators there already reuse memory).
"""
from __future__ import annotations

import functools

import torch

from .paths import host_path


_POOL: dict[tuple, torch.Tensor] = {}
_DIRTY_ROWS: dict[tuple, tuple] = {}  # (num_rows, dim, rows written) since the buffer was last all zero


def _use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


_UNSHARED = _use_count(torch.empty(1))  # the tensor itself plus the temporary storage wrapper


def _acquire(key: tuple, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """A flat CPU buffer of at least `numel` elements owned by nobody else; True if it was reused."""
    buffer = _POOL.get(key)
    if buffer is not None and buffer.numel() >= numel and _use_count(buffer) <= _UNSHARED:
        return buffer, True
    if buffer is not None and buffer.numel() >= numel:  # still referenced: leave it to its holder
        numel = buffer.numel()
    buffer = torch.empty(numel, dtype=dtype)
    _POOL[key] = buffer
    return buffer, False


def reusable_empty(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Like torch.empty(shape) (contiguous, contents undefined), from the pool on CPU."""
    device = torch.device(device)
    numel = 1
    for size in shape:
        numel *= size
    if not host_path(device):
        return torch.empty(shape, dtype=dtype, device=device)
    buffer, _ = _acquire((name, dtype), numel, dtype)
    _DIRTY_ROWS.pop((name, dtype), None)
    return buffer[:numel].view(shape)


def scatter_rows(name: str, num_rows: int, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """zeros([num_rows, D]).index_add_(0, index, rows) without filling num_rows x D zeros every call on CPU: a
    reused buffer only has the rows written by its previous use zeroed again."""
    dim = rows.shape[1]
    if not host_path(rows.device):
        return torch.zeros(num_rows, dim, dtype=rows.dtype, device=rows.device).index_add_(0, index, rows)
    key = (name, rows.dtype)
    flat, reused = _acquire(key, num_rows * dim, rows.dtype)
    out = flat[: num_rows * dim].view(num_rows, dim)
    dirty = _DIRTY_ROWS.get(key)
    if reused and dirty is not None and dirty[:2] == (num_rows, dim):
        out.index_fill_(0, dirty[2], 0)
    else:
        out.zero_()
    _DIRTY_ROWS[key] = (num_rows, dim, index.clone())
    return out.index_add_(0, index, rows)


@functools.lru_cache(maxsize=64)
def constant_arange(size: int, device: torch.device, descending: bool = False) -> torch.Tensor:
    """torch.arange(size) (int64) on `device`, or size - 1 .. 0 if `descending`, built once per size and device:
    a constant of the step, which callers only read. In eager mode on an accelerator each arange is a kernel
    launch."""
    with torch.inference_mode(False):  # a cached tensor must stay usable outside inference mode
        return torch.arange(size - 1, -1, -1, device=device) if descending else torch.arange(size, device=device)


def uniform_below(uniform: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """floor(u * n) as int64 for float64 u in [0, 1) (torch.rand) and integer n >= 0: a uniform draw from 0 .. n - 1
    (0 where n = 0). No clamp to n - 1 is needed: the largest u, 1 - 2**-53, times an integer n < 2**53 rounds to a
    double below n (the product's distance to n, n * 2**-53, is more than half the spacing of doubles below n, or
    exactly that spacing when n is a power of two), and rounding is monotone in u. (In fp32 it would round up.)
    One multiply and one conversion: truncation is floor for a product >= 0."""
    return (uniform * count).long()
