"""Per-class FIFO queues of negative features, shared by all ranks (U2PL_SPEC.md section 6).

One flat buffer [sum(capacities) + 1, dim] holds every class's ring region (offset_c .. offset_c + capacity_c);
the extra last row is a scratch row that absorbs padded writes. Per-class write pointer and fill count are device
tensors. Semantics equal the published dequeue_and_enqueue (`queue = cat(queue, keys)[-capacity:]`): after a push
class c holds, as a multiset, the newest min(total pushed, capacity_c) keys.

A push is vectorised over classes (`write_compacted`): each (pixel, class) pair gets its rank within its class by a
cumsum, only the newest capacity_c pairs per class are kept, their ring slots are computed arithmetically and
written by one row copy. The kept pairs are compacted with `torch.nonzero_static` to a size fixed by the shapes
(min(pixels x classes, sum(capacities), max_pairs)), so accelerators never sync. The write is a stage that
u2pl_scale/accel may replace (a host-side copy on CPU, Triton kernels on CUDA): `ClassQueues(write=...)`; every
implementation writes identical queues.

`push_distributed` does ONE fixed-size all_gather per step for all classes, whose size does not grow with the
world size W: each rank sends, for every class c, at most b_c = ceil(capacity_c / W) of its negatives of c, drawn
uniformly without replacement where it has more (all of them, in pixel order, where it has no more), in the queue
dtype, with a label column. The gathered rows (W x sum_c b_c, about the queues' total capacity) are pushed in
rank order, so every rank ends with identical queues, holding every rank's negatives in proportion. The published
push gathers every pixel of every rank and keeps the newest capacity_c rows in rank order: with more negatives
than the capacity in one step (VOC shapes on 4 GPUs: 133k pixels per rank against 30k rows) its queues hold the
last ranks' last pixels only. Where no rank has more than b_c negatives of a class, both pushes are the same.
`method.contrastive.exchange_fraction` f < 1 budgets ceil(f x capacity_c) rows per class per step for the whole
cluster (b_c = ceil of that / W; at W = 1 too): the queues then hold the newest ~1/f steps' negatives instead of the
newest step's, and the exchange moves f times the bytes (benchmarks/scaling.py).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..dist import all_gather_cat


def uniform_below(uniform: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """floor(u * n) as int64 for float64 u in [0, 1) (torch.rand) and integer n >= 0: a uniform draw from 0 .. n - 1
    (0 where n = 0). No clamp to n - 1 is needed: the largest u, 1 - 2**-53, times an integer n < 2**53 rounds to a
    double below n (the product's distance to n, n * 2**-53, is more than half the spacing of doubles below n, or
    exactly that spacing when n is a power of two), and rounding is monotone in u. (In fp32 it would round up.)
    One multiply and one conversion: truncation is floor for a product >= 0."""
    return (uniform * count).long()


def index_copy_rows(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
                    count: torch.Tensor, spare_row: int) -> None:
    """dst[dst_index[i]] = src[src_index[i]] for i < count; the entries from `count` on (padding) go to `spare_row`
    if it is >= 0, else to the rows their dst_index names: either way rows nothing reads. One index_copy_ of the
    whole padded list."""
    if spare_row >= 0:
        padding = torch.arange(dst_index.shape[0], device=dst_index.device) >= count
        dst_index = dst_index.masked_fill(padding, spare_row)
    dst.index_copy_(0, dst_index, src.index_select(0, src_index).to(dst.dtype))


def write_compacted(queues: "ClassQueues", features: torch.Tensor, mask_cn: torch.Tensor,
                    max_pairs: Optional[int] = None, copy_rows: Callable = index_copy_rows) -> None:
    """Stage: push row i of `features` [N, dim] into every class c with mask_cn[c, i] (bool [C, N], finite rows
    only), rows in order, as the module docstring says; `copy_rows` writes the kept pairs (index_copy_rows
    signature). No host read: the kept pairs are compacted to a static size."""
    rank_in_class = torch.cumsum(mask_cn, dim=1, dtype=torch.int32)  # 1-based rank of pair among its class
    pushed = rank_in_class[:, -1]  # pairs per class this push (int32; int64 once combined with the long state)
    kept = torch.minimum(pushed, queues.capacities)  # only the newest capacity_c pairs can survive
    overflow = pushed - kept  # the oldest pairs, which cannot
    keep = mask_cn & (rank_in_class > overflow[:, None])

    # each class keeps at most its capacity, so at most total_capacity pairs are kept: that size never drops one
    static_size = min(mask_cn.numel(), queues.total_capacity)
    can_drop = max_pairs is not None and int(max_pairs) < static_size
    if can_drop:
        static_size = int(max_pairs)
    # (class, row) of the kept pairs in class-major order, then padding (0, 0): a real row, written to scratch
    pairs = torch.nonzero_static(keep, size=static_size, fill_value=0)
    total_pairs = kept.sum()
    if can_drop:
        queues.dropped_pairs += (total_pairs - static_size).clamp(min=0)
        total_pairs = total_pairs.clamp(max=static_size)

    cls, row = pairs[:, 0], pairs[:, 1]
    # the ring slot of every (class, row) pair, offset_c + (write_ptr_c - overflow_c + rank - 1) mod capacity_c,
    # over the whole [C, N] grid (a few elementwise passes), then one gather of the kept pairs' slots
    ring_start = (queues.write_ptr - overflow - 1)[:, None]
    slot_cn = torch.remainder(rank_in_class + ring_start, queues.capacities[:, None]).add_(queues.offsets[:, None])
    copy_rows(queues.buffer, slot_cn[cls, row], features, row, total_pairs, queues.scratch_row)

    queues.write_ptr.add_(kept).remainder_(queues.capacities)
    queues.fill.add_(pushed).clamp_(max=queues.capacities)


def finite_rows(features: torch.Tensor) -> torch.Tensor:
    """[1, N] bool: the rows with every value finite. A queue never takes another: one inf or NaN row would make
    every later contrastive loss that samples it non-finite (engine/guard.py skips such steps, it cannot mend them)."""
    return torch.isfinite(features).all(dim=1)[None, :]


class ClassQueues:
    def __init__(
        self,
        num_classes: int,
        dim: int,
        capacities: Union[int, Sequence[int]],
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
        exchange_fraction: float = 1.0,
        write: Callable = write_compacted,
    ):
        """`write`: the queue write stage (write_compacted's signature), u2pl_scale/accel's for the device if given."""
        if isinstance(capacities, int):
            capacities = [capacities] * num_classes
        capacities = [int(c) for c in capacities]
        if len(capacities) != num_classes or min(capacities) < 1:
            raise ValueError(f"ClassQueues needs {num_classes} positive capacities, got {capacities}")
        self.num_classes = num_classes
        self.dim = dim
        self.dtype = dtype
        self.capacity_list = capacities
        if not 0.0 < exchange_fraction <= 1.0:
            raise ValueError(f"ClassQueues: exchange_fraction must be in (0, 1], got {exchange_fraction}")
        self.exchange_fraction = float(exchange_fraction)
        self.total_capacity = sum(capacities)
        self.scratch_row = self.total_capacity
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.capacities = torch.tensor(capacities, dtype=torch.long, device=device)
        self.offsets_list = [sum(capacities[:c]) for c in range(num_classes)]
        self.offsets = torch.tensor(self.offsets_list, dtype=torch.long, device=device)
        self.buffer = torch.zeros(self.total_capacity + 1, dim, dtype=dtype, device=device)
        self.write_ptr = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.fill = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.dropped_pairs = torch.zeros((), dtype=torch.long, device=device)  # only with a small max_pairs
        self.write = write
        self._layout: dict = {}  # pack's budgets and block layout per (world size, block width, device)

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    # ------------------------------------------------------------------ push
    @torch.no_grad()
    def push(self, features: torch.Tensor, class_mask: torch.Tensor, max_pairs: Optional[int] = None) -> None:
        """Push pixel i's feature into every class c with class_mask[i, c], pixels in order of i.

        features [N, dim], class_mask [N, C] bool. `max_pairs` optionally tightens the static compaction size
        (pairs beyond it are dropped and counted in `dropped_pairs`; write stages that need no compaction then
        compact too).
        """
        num_rows = features.shape[0]
        if class_mask.shape != (num_rows, self.num_classes):
            raise ValueError(f"class_mask must be [{num_rows}, {self.num_classes}], got {tuple(class_mask.shape)}")
        if num_rows == 0:
            return
        mask_cn = class_mask.t().to(torch.bool) & finite_rows(features)  # [C, N]: pairs in class-major order
        self.write(self, features, mask_cn, max_pairs)

    @torch.no_grad()
    def push_distributed(
        self, features: torch.Tensor, class_mask: torch.Tensor, group=None, max_pairs: Optional[int] = None
    ) -> None:
        """Every rank's budgeted negatives (see the module docstring) with one all_gather, pushed in rank order.

        Every rank must pass the same number of rows P (pad with all-false masks if needed). Without an
        initialised process group, or with world size 1, this is `push`.
        """
        world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if world_size == 1:
            if self.exchange_fraction < 1.0:  # the same budget as a cluster's, without the collective
                self.push_packed(self.pack(features, class_mask, 1), max_pairs=max_pairs)
            else:
                self.push(features, class_mask, max_pairs=max_pairs)
            return
        everything = all_gather_cat(self.pack(features, class_mask, world_size), group=group)  # rank order
        self.push_packed(everything, max_pairs=max_pairs)

    def budgets(self, world_size: int) -> list[int]:
        """Rows per class each rank sends: ceil(ceil(exchange_fraction x capacity_c) / W)."""
        return [-(-math.ceil(self.exchange_fraction * c) // world_size) for c in self.capacity_list]

    @torch.no_grad()
    def pack(self, features: torch.Tensor, class_mask: torch.Tensor, world_size: Optional[int] = None
             ) -> torch.Tensor:
        """[sum_c min(b_c, P), dim + 1]: what each rank sends in `push_distributed`, in the queue dtype. Block c
        holds up to b_c of this rank's negatives of class c (a uniform draw where there are more, the pixel order
        kept), then padding; the last column is c + 1 on real rows, 0 on padding. Fixed shapes: no host sync."""
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        num_rows, device = features.shape[0], features.device
        b_max = max(1, min(max(self.budgets(world_size)), num_rows))
        key = (world_size, b_max, device)
        if key not in self._layout:  # built once per shape, not per step (no host-to-device copy in the step)
            budgets = self.budgets(world_size)
            self._layout[key] = (torch.tensor(budgets, device=device), torch.cat(
                [torch.arange(min(b, b_max)) + c * b_max for c, b in enumerate(budgets)]).to(device))
        budgets, blocks = self._layout[key]
        mask_cn = class_mask.t().to(torch.bool) & finite_rows(features)
        # a random key in [0, 1) per negative, 2 elsewhere: the b smallest keys of a class are a uniform draw of
        # min(b, count) of its negatives
        keys = torch.rand(mask_cn.shape, device=device).masked_fill_(~mask_cn, 2.0)
        chosen_keys, chosen = keys.topk(b_max, dim=1, largest=False, sorted=True)
        real = (chosen_keys < 1.0) & (torch.arange(b_max, device=device)[None, :] < budgets[:, None])
        chosen = torch.where(real, chosen, num_rows).sort(dim=1).values  # pixel order; padding last
        label = torch.where(chosen < num_rows, torch.arange(1, self.num_classes + 1, device=device)[:, None], 0)
        # class c's block is its first min(b_c, b_max) columns: a ragged layout, so the message is sum_c b_c rows
        chosen, label = chosen.reshape(-1)[blocks], label.reshape(-1)[blocks]
        wire = self._wire_dtype()
        rows = features.to(wire)[chosen.clamp(max=max(num_rows - 1, 0))]
        return torch.cat([rows, label[:, None].to(wire)], dim=1).contiguous()

    def _wire_dtype(self) -> torch.dtype:
        # the label column must hold num_classes exactly: the integers each float type counts exactly up to
        exact_up_to = {torch.float32: 2 ** 24, torch.float16: 2048, torch.bfloat16: 256}.get(self.dtype, 0)
        return self.dtype if self.num_classes < exact_up_to else torch.float32

    @torch.no_grad()
    def push_packed(self, everything: torch.Tensor, max_pairs: Optional[int] = None) -> None:
        """Push rows packed by `pack` (every rank's, in rank order): each real row to the class of its label."""
        label = everything[:, self.dim].round().long()
        classes = torch.arange(1, self.num_classes + 1, device=everything.device)
        self.push(everything[:, : self.dim], label[:, None] == classes[None, :], max_pairs=max_pairs)

    # ---------------------------------------------------------------- sample
    def sample_indices(
        self,
        num: int,
        classes: Optional[Union[int, torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform indices (with replacement) into `buffer` from each class's filled part.

        classes: None (all), an int, or a 1-D long tensor. Returns (index [K, num] long, valid [K] bool); rows of
        empty queues point at their region's first slot and are flagged invalid.
        """
        if classes is None:  # all classes: no index needed
            fill, offsets = self.fill, self.offsets
        else:
            if isinstance(classes, int):
                classes = torch.full((1,), classes, dtype=torch.long, device=self.device)
            elif not torch.is_tensor(classes):
                classes = torch.tensor(classes, dtype=torch.long).to(self.device)  # a host list: one copy
            classes = classes.to(device=self.device, dtype=torch.long).reshape(-1)
            fill, offsets = self.fill[classes], self.offsets[classes]
        uniform = torch.rand(fill.numel(), num, generator=generator, device=self.device, dtype=torch.float64)
        return uniform_below(uniform, fill[:, None]).add_(offsets[:, None]), fill > 0  # empty: position 0

    def sample(
        self,
        num: int,
        classes: Optional[Union[int, torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [K, num, dim] sampled with replacement per class, and valid [K] (False for empty queues)."""
        index, valid = self.sample_indices(num, classes, generator)
        return self.buffer.index_select(0, index.reshape(-1)).reshape(*index.shape, self.dim), valid

    def class_features(self, cls: int) -> torch.Tensor:
        """The filled rows of one class (host-side helper for tests and inspection; syncs)."""
        offset = int(self.offsets[cls])
        return self.buffer[offset : offset + int(self.fill[cls])]

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "buffer": self.buffer,
            "write_ptr": self.write_ptr,
            "fill": self.fill,
            "capacities": self.capacities,
            "dropped_pairs": self.dropped_pairs,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["capacities"].tolist() != self.capacity_list or state["buffer"].shape != self.buffer.shape:
            raise ValueError(
                f"queue checkpoint has capacities {state['capacities'].tolist()} and buffer "
                f"{tuple(state['buffer'].shape)}; this run has {self.capacity_list} and {tuple(self.buffer.shape)}"
            )
        self.buffer.copy_(state["buffer"])
        self.write_ptr.copy_(state["write_ptr"])
        self.fill.copy_(state["fill"])
        self.dropped_pairs.copy_(state.get("dropped_pairs", torch.zeros(())))
