"""The CUDA stages: Triton kernels over the reference stages where eager code on a GPU pays the host's work of
issuing many small ops (accel/triton_kernels.py). Where Triton is missing, or a launch failed once, each falls back
to the reference stage; traced code (train.compile_method) takes the reference except for the queue write's row
copy, a custom operator that CUDA graphs capture."""
from __future__ import annotations

import functools

import torch

from ..method.queues import write_compacted
from ..method.reliability import fractions, interpolated, sorted_valid
from ..method.stages import REFERENCE, Stages
from . import triton_kernels


def cuda_stages(compiled: bool) -> Stages:
    """Eager code: Triton percentiles and queue push. Compiled code: the reference, with the compacted write's row
    copy as the custom operator (which skips the padding on the GPU)."""
    compacted = functools.partial(write_compacted, copy_rows=triton_kernels.copy_rows_)
    if compiled:
        return REFERENCE.replace("cuda-compiled", queue_write=compacted)
    return REFERENCE.replace("cuda", percentiles_and_count=percentiles_and_count,
                             queue_write=functools.partial(queue_write, compacted=compacted))


def percentiles_and_count(values, valid_mask, qs, masked=None):
    """The reference's sort, then up to four percentiles interpolated in one Triton launch
    (launch_triton_percentiles) where the reference takes a dozen small ops."""
    if torch.is_tensor(qs):
        return REFERENCE.percentiles_and_count(values, valid_mask, qs, masked)
    sorted_values, count = sorted_valid(values, valid_mask, masked)
    selected = triton_kernels.select_percentiles(sorted_values, count, fractions(qs))
    if selected is None:
        return interpolated(lambda bounds: sorted_values[bounds], count, qs), count
    return selected, count


def queue_write(queues, features, mask_cn, max_pairs=None, *, compacted):
    """The whole push after the ranks' cumsum as two Triton kernels (launch_triton_push): each kept pair's row goes
    straight to its ring slot, no pairs compacted. `max_pairs`, or no Triton, take the compacted write."""
    if max_pairs is None:
        rank_in_class = torch.cumsum(mask_cn, dim=1, dtype=torch.int32)
        if triton_kernels.push_rows_(queues.buffer, features.to(queues.dtype), mask_cn, rank_in_class,
                                     queues.write_ptr, queues.fill, queues.capacities, queues.offsets):
            return
    compacted(queues, features, mask_cn, max_pairs)
