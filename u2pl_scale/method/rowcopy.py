"""copy_rows_: dst[dst_index[i]] = src[src_index[i]] for the first `count` entries, `count` a device tensor.

The queue push (queues.py) writes its kept (pixel, class) pairs compacted to a static size, the real pairs first
and padding after (directed at a scratch row), so that accelerators never read the number of pairs back. With
index_copy_ every padded entry costs as much as a real one: at the VOC shapes the static size is the queues' whole
capacity (650,000 rows of 256 floats), and on an H100 that one index_copy_ took 4.2 ms of the method's 7.4 ms of
GPU time whatever the number of real pairs (benchmarks/RESULTS.md). On a CUDA device with Triton, a Triton kernel
copies whole rows (one program per block of rows, each row's columns contiguous) and masks off the entries at or
after `count`, which cost no memory traffic: the copy moves the real rows only. Elsewhere it is the index_copy_
of the padded list (same result outside the scratch row, which is never read).

It is a custom operator (torch.library) that mutates `dst`, so torch.compile keeps it as one call in the graph
and CUDA graphs capture its launch.
"""
from __future__ import annotations

import warnings

import torch

from .buffers import constant_arange

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack Triton: the index_copy_ path serves every device
    triton = None

BLOCK_ROWS = 16


if triton is not None:

    @triton.jit
    def _copy_rows_kernel(dst_ptr, src_ptr, dst_index_ptr, src_index_ptr, count_ptr, dim, dst_stride, src_stride,
                          dst_index_stride, src_index_stride, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        live = rows < tl.load(count_ptr)
        dst_rows = tl.load(dst_index_ptr + rows * dst_index_stride, mask=live, other=0).to(tl.int64)
        src_rows = tl.load(src_index_ptr + rows * src_index_stride, mask=live, other=0).to(tl.int64)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = live[:, None] & (cols[None, :] < dim)
            values = tl.load(src_ptr + src_rows[:, None] * src_stride + cols[None, :], mask=mask)
            tl.store(dst_ptr + dst_rows[:, None] * dst_stride + cols[None, :], values, mask=mask)


def launch_triton(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
                  count: torch.Tensor) -> None:
    """The Triton copy (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, as the tests run it)."""
    src = src.to(dst.dtype)  # rows are copied bit for bit (the queue's callers pass its dtype already)
    if dst.stride(1) != 1 or src.stride(1) != 1:
        raise ValueError("copy_rows_ needs rows with contiguous columns")
    entries = dst_index.shape[0]
    if entries == 0:
        return
    dim = dst.shape[1]
    block_d = min(triton.next_power_of_2(dim), 256)
    grid = (triton.cdiv(entries, BLOCK_ROWS),)
    _copy_rows_kernel[grid](dst, src, dst_index, src_index, count.reshape(1), dim, dst.stride(0), src.stride(0),
                            dst_index.stride(0), src_index.stride(0), BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=block_d)


_triton_failed: list[str] = []  # the error of a Triton launch that failed once (then index_copy_ from there on)


def _uses_triton(dst: torch.Tensor) -> bool:
    return triton is not None and dst.is_cuda and not _triton_failed


def _copy_rows(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
               count: torch.Tensor, spare_row: int) -> None:
    if _uses_triton(dst):
        try:
            launch_triton(dst, dst_index, src, src_index, count)
            return
        except Exception as error:  # a Triton that cannot build the kernel here: say so, and copy the slow way
            _triton_failed.append(f"{type(error).__name__}: {error}")
            warnings.warn(f"u2pl_scale copy_rows_: the Triton row copy failed ({_triton_failed[0][:500]}); the "
                          "queue push uses index_copy_ from now on (correct, slower)", RuntimeWarning, stacklevel=3)
    if spare_row >= 0:  # the entries from `count` on are written to the spare row
        padding = constant_arange(dst_index.shape[0], dst_index.device) >= count
        dst_index = dst_index.masked_fill(padding, spare_row)
    dst.index_copy_(0, dst_index, src.index_select(0, src_index).to(dst.dtype))


@torch.library.custom_op("u2pl_scale::copy_rows_", mutates_args=("dst",))
def _copy_rows_op(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
                  count: torch.Tensor, spare_row: int) -> None:
    _copy_rows(dst, dst_index, src, src_index, count, spare_row)


@_copy_rows_op.register_fake
def _(dst, dst_index, src, src_index, count, spare_row) -> None:
    return None


def copy_rows_(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
               count: torch.Tensor, spare_row: int = -1) -> None:
    """dst[dst_index[i]] = src[src_index[i]] for i < count. dst [R, D], src [S, D], indices [N] int64 (strided views
    allowed), count a 0-d or 1-element int64 tensor on the same device. The entries from `count` on are not copied
    where the device can skip them (Triton); elsewhere the index_copy_ writes them to `spare_row` if given (>= 0),
    else to the rows their dst_index names: either way a row of dst that nothing reads.

    Traced code calls the custom operator (one call in the graph, which CUDA graphs capture); eager code calls the
    implementation directly, since a torch.library custom op costs about 30 us of host time per call in eager mode
    (measured on CPU: 40 us against 10 us for the same index_select + index_copy_)."""
    if torch.compiler.is_compiling():
        torch.ops.u2pl_scale.copy_rows_(dst, dst_index, src, src_index, count, spare_row)
        return
    _copy_rows(dst, dst_index, src, src_index, count, spare_row)
    torch.autograd.graph.increment_version(dst)  # as the custom op's in-place mutation would
