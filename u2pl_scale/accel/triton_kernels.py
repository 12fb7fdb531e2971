"""The method's Triton kernels, for CUDA devices (the CUDA stages: accel/cuda.py): each replaces a run of small
torch ops where the eager method's cost on a GPU is the host's work to issue them. Where Triton is missing or a
launch fails (warned once), the reference torch ops run; compiled code (train.compile_method) uses them too, except
copy_rows_.

copy_rows_: dst[dst_index[i]] = src[src_index[i]] for the first `count` entries, `count` a device tensor. The
queue push (queues.py) writes its kept (pixel, class) pairs compacted to a static size, the real pairs first
and padding after (directed at a scratch row), so that accelerators never read the number of pairs back. With
index_copy_ every padded entry costs as much as a real one: at the VOC shapes the static size is the queues' whole
capacity (650,000 rows of 256 floats), so that one copy would dominate the method's GPU time whatever the number
of real pairs. On a CUDA device with Triton, a Triton kernel
copies whole rows (one program per block of rows, each row's columns contiguous) and masks off the entries at or
after `count`, which cost no memory traffic: the copy moves the real rows only. Elsewhere it is the index_copy_
of the padded list (same result outside the scratch row, which is never read).

It is a custom operator (torch.library) that mutates `dst`, so torch.compile keeps it as one call in the graph
and CUDA graphs capture its launch; eager callers skip the operator's dispatch.

`launch_triton_push` is the whole queue push after the ranks' cumsum as two Triton kernels, for eager code on
CUDA: one program per (block of rows, class) writes the kept rows straight to their ring slots (no compaction of
the pairs, no padding), then one program advances the write pointers and fill counts. It replaces the ~15 small ops
of the compacted push.

`launch_triton_percentiles` interpolates up to four percentiles of the sorted entropies (reliability) in one
launch, where the position arithmetic, gather, lerp and empty-set guard are a dozen torch ops; the fractions are
kernel arguments (float64 bits), so nothing is copied to the device.
"""
from __future__ import annotations

import struct
import warnings
from typing import Any, Callable

import torch

from ..method.queues import index_copy_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack Triton: the torch ops serve every device
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


if triton is not None:

    @triton.jit
    def _push_kernel(dst_ptr, src_ptr, mask_ptr, rank_ptr, write_ptr_ptr, capacity_ptr, offset_ptr, num_rows, dim,
                     dst_stride, src_stride, mask_stride_c, mask_stride_n, rank_stride_c,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # program (row block, class c): the block's pairs (row, c) that the push keeps, each to its ring slot
        c = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        live = rows < num_rows
        chosen = tl.load(mask_ptr + c * mask_stride_c + rows * mask_stride_n, mask=live, other=0) != 0
        rank = tl.load(rank_ptr + c * rank_stride_c + rows, mask=live, other=0).to(tl.int64)
        pushed = tl.load(rank_ptr + c * rank_stride_c + num_rows - 1).to(tl.int64)
        capacity = tl.load(capacity_ptr + c)
        overflow = tl.maximum(pushed - capacity, 0)  # the oldest pairs, which the newest overwrite
        keep = chosen & (rank > overflow)
        position = rank + tl.load(write_ptr_ptr + c) - overflow - 1  # >= 0 where kept
        slot = tl.where(keep, tl.load(offset_ptr + c) + position % capacity, 0)
        src_rows = rows.to(tl.int64)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = keep[:, None] & (cols[None, :] < dim)
            values = tl.load(src_ptr + src_rows[:, None] * src_stride + cols[None, :], mask=mask)
            tl.store(dst_ptr + slot[:, None] * dst_stride + cols[None, :], values, mask=mask)

    @triton.jit
    def _advance_kernel(rank_ptr, write_ptr_ptr, fill_ptr, capacity_ptr, num_rows, num_classes, rank_stride_c,
                        BLOCK_C: tl.constexpr):
        # after _push_kernel (same stream): write pointers and fill counts of every class
        c = tl.arange(0, BLOCK_C)
        live = c < num_classes
        pushed = tl.load(rank_ptr + c * rank_stride_c + num_rows - 1, mask=live, other=0).to(tl.int64)
        capacity = tl.load(capacity_ptr + c, mask=live, other=1)
        write_ptr = tl.load(write_ptr_ptr + c, mask=live, other=0)
        fill = tl.load(fill_ptr + c, mask=live, other=0)
        tl.store(write_ptr_ptr + c, (write_ptr + tl.minimum(pushed, capacity)) % capacity, mask=live)
        tl.store(fill_ptr + c, tl.minimum(fill + pushed, capacity), mask=live)


def launch_triton_push(buffer: torch.Tensor, features: torch.Tensor, mask_cn: torch.Tensor,
                       rank_in_class: torch.Tensor, write_ptr: torch.Tensor, fill: torch.Tensor,
                       capacities: torch.Tensor, offsets: torch.Tensor) -> None:
    """The queue push (queues.ClassQueues.push) as two Triton kernels, given the pairs' 1-based ranks within their
    class (rank_in_class [C, N] int32, a cumsum of mask_cn [C, N] bool): each kept pair's row goes straight to its
    ring slot, with no compaction of the pairs and none of the ~15 small ops around it; then the write pointers
    and fill counts advance. Same slots and state as the compacted push. Re-running it after a failed second
    kernel writes the same rows to the same slots (the state it reads is unchanged)."""
    num_classes, num_rows = mask_cn.shape
    if features.stride(1) != 1 or buffer.stride(1) != 1 or rank_in_class.stride(1) != 1:
        raise ValueError("the Triton push needs rows with contiguous columns")
    dim = buffer.shape[1]
    block_d = min(triton.next_power_of_2(dim), PUSH_BLOCK_D)
    grid = (triton.cdiv(num_rows, PUSH_BLOCK_ROWS), num_classes)
    mask = mask_cn.view(torch.uint8)
    _push_kernel[grid](buffer, features, mask, rank_in_class, write_ptr, capacities, offsets, num_rows, dim,
                       buffer.stride(0), features.stride(0), mask.stride(0), mask.stride(1), rank_in_class.stride(0),
                       BLOCK_ROWS=PUSH_BLOCK_ROWS, BLOCK_D=block_d)
    _advance_kernel[(1,)](rank_in_class, write_ptr, fill, capacities, num_rows, num_classes, rank_in_class.stride(0),
                          BLOCK_C=triton.next_power_of_2(num_classes))


if triton is not None:

    @triton.jit(do_not_specialize=["q0", "q1", "q2", "q3"])
    def _percentile_kernel(sorted_ptr, count_ptr, out_ptr, q0, q1, q2, q3, num_qs, BLOCK: tl.constexpr):
        # up to four percentiles of the first `count` sorted values; q0..q3 are the fractions' float64 bits
        i = tl.arange(0, BLOCK)
        live = i < num_qs
        # int64 before the bitcast: Triton types an int argument that fits in 32 bits (a fraction of 0.0) as i32
        bits = tl.where(i == 0, q0, tl.where(i == 1, q1, tl.where(i == 2, q2, q3))).to(tl.int64)
        fraction = bits.to(tl.float64, bitcast=True)
        count = tl.load(count_ptr)
        position = fraction * tl.maximum(count - 1, 0).to(tl.float64)  # numpy's "linear": (count - 1) q
        lower = tl.floor(position)
        weight = (position - lower).to(tl.float32)
        low = tl.load(sorted_ptr + lower.to(tl.int64), mask=live, other=0.0)
        high = tl.load(sorted_ptr + tl.ceil(position).to(tl.int64), mask=live, other=0.0)
        # torch.lerp's formula
        value = tl.where(weight < 0.5, low + weight * (high - low), high - (high - low) * (1.0 - weight))
        tl.store(out_ptr + i, tl.where(count > 0, value, float("inf")), mask=live)


def _float64_bits(value: float) -> int:
    """The bits of a float64 as a signed int64 (+ 0.0 turns -0.0, whose bits are 2**63, into 0.0)."""
    return struct.unpack("<q", struct.pack("<d", value + 0.0))[0]


def launch_triton_percentiles(sorted_values: torch.Tensor, count: torch.Tensor, fractions: list) -> torch.Tensor:
    """[len(fractions)] fp32: for each fraction f in [0, 1], sorted_values at position f (count - 1), interpolated
    linearly between its neighbours (numpy.percentile's default); +inf where count is 0. One launch; the fractions
    travel as kernel arguments (their float64 bits: Triton passes Python floats as fp32), so no host-to-device copy."""
    if not 0 < len(fractions) <= PERCENTILE_SLOTS:
        raise ValueError(f"the percentile kernel takes 1 to {PERCENTILE_SLOTS} percentiles, got {len(fractions)}")
    out = torch.empty(len(fractions), dtype=torch.float32, device=sorted_values.device)
    bits = [_float64_bits(float(f)) for f in fractions] + [0] * (PERCENTILE_SLOTS - len(fractions))
    _percentile_kernel[(1,)](sorted_values, count, out, *bits, len(fractions), BLOCK=PERCENTILE_SLOTS)
    return out


def select_percentiles(sorted_values: torch.Tensor, count: torch.Tensor, fractions: list) -> torch.Tensor | None:
    """launch_triton_percentiles where Triton runs it (see _run_triton) and takes these fractions; None (the caller
    computes them with torch ops) otherwise."""
    if not 0 < len(fractions) <= PERCENTILE_SLOTS or sorted_values.dtype != torch.float32:
        return None
    ran, out = _run_triton(sorted_values, launch_triton_percentiles, sorted_values, count, fractions)
    return out if ran else None


PERCENTILE_SLOTS = 4
PUSH_BLOCK_ROWS = 64
# columns per iteration of the push: a 64 x 64 tile is 32 values per thread of its 4 warps; a 64 x 256 tile took
# all 255 registers and spilled (sm90, fp32; tests/unit/test_accel_triton.py checks the compiled resource usage)
PUSH_BLOCK_D = 64
_triton_failed: list[str] = []  # the error of a Triton launch that failed once (then torch ops from there on)


def _uses_triton(dst: torch.Tensor) -> bool:
    return triton is not None and dst.is_cuda and not _triton_failed


def push_rows_(buffer: torch.Tensor, features: torch.Tensor, mask_cn: torch.Tensor, rank_in_class: torch.Tensor,
               write_ptr: torch.Tensor, fill: torch.Tensor, capacities: torch.Tensor, offsets: torch.Tensor) -> bool:
    """The fused queue push (launch_triton_push) where Triton runs it (see _run_triton): True if it ran; False, and
    the caller compacts the pairs instead, otherwise."""
    return _run_triton(buffer, launch_triton_push, buffer, features, mask_cn, rank_in_class, write_ptr, fill,
                       capacities, offsets)[0]


def _run_triton(tensor: torch.Tensor, launch: Callable, *args) -> tuple[bool, Any]:
    """(True, launch(*args)) where a Triton kernel can run for `tensor` (CUDA with Triton) and the code is not being
    traced (compiled code takes the torch ops); (False, None) otherwise, and from the first failed launch on (a
    Triton that cannot build a kernel here: warned once, then every kernel here gives way to torch ops)."""
    if not _uses_triton(tensor) or torch.compiler.is_compiling():
        return False, None
    try:
        return True, launch(*args)
    except Exception as error:
        _triton_failed.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"u2pl_scale: a Triton kernel of the method failed ({_triton_failed[0][:500]}); the method "
                      "uses torch ops instead from now on (the queue push compacts its pairs and copies them with "
                      "index_copy_; correct, slower)", RuntimeWarning, stacklevel=3)
        return False, None


def _copy_rows(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
               count: torch.Tensor, spare_row: int) -> None:
    if not _run_triton(dst, launch_triton, dst, dst_index, src, src_index, count)[0]:
        index_copy_rows(dst, dst_index, src, src_index, count, spare_row)


@torch.library.custom_op("u2pl_scale::copy_rows_", mutates_args=("dst",))
def _copy_rows_op(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
                  count: torch.Tensor, spare_row: int) -> None:
    _copy_rows(dst, dst_index, src, src_index, count, spare_row)


@_copy_rows_op.register_fake
def _(dst, dst_index, src, src_index, count, spare_row) -> None:
    return None


def copy_rows_(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
               count: torch.Tensor, spare_row: int = -1) -> None:
    """dst[dst_index[i]] = src[src_index[i]] for i < count (queues.index_copy_rows's contract). dst [R, D], src
    [S, D], indices [N] int64 (strided views allowed), count a 0-d or 1-element int64 tensor on the same device.
    The entries from `count` on are not copied where the device can skip them (Triton); elsewhere the index_copy_
    writes them to `spare_row` if given (>= 0), else to the rows their dst_index names: a row nothing reads.

    Traced code calls the custom operator (one call in the graph, which CUDA graphs capture); eager code calls the
    implementation directly, since a torch.library custom op costs about 30 us of host time per call in eager mode
    (measured on CPU: 40 us against 10 us for the same index_select + index_copy_)."""
    if torch.compiler.is_compiling():
        torch.ops.u2pl_scale.copy_rows_(dst, dst_index, src, src_index, count, spare_row)
        return
    _copy_rows(dst, dst_index, src, src_index, count, spare_row)
    torch.autograd.graph.increment_version(dst)  # as the custom op's in-place mutation would
