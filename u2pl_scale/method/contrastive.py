"""Contrastive loss with unreliable pixels as negatives (U2PL_SPEC.md section 6, published
compute_contra_memobank_loss), batched over classes with fixed shapes and no host sync.

Pixels are indexed p = n*h*w + y*w + x over the labeled + unlabeled batch at feature resolution (stride 4).
For class c:
- anchor candidates: label == c, low entropy, teacher q_c > anchor_threshold;
- prototype: mean teacher feature over label == c & low entropy (no grad);
- negatives: high entropy, q_c < negative_threshold and
  unlabeled: c ranked in [low_rank, high_rank) of the teacher's sorted q;
  labeled:   c in the teacher's top low_rank and c != the true label.
All negatives are pushed (one collective for all classes) into the ClassQueues before sampling. For every class
present (has label == c & low pixels) with anchors and a non-empty queue: num_anchors anchors with replacement
(u * count -> searchsorted in the class's running count), num_anchors * num_negatives queue rows with replacement,
logits = cosine(anchor, [prototype, negatives]) / temperature, CE with target 0. Loss = sum over those classes /
number of classes present, and 0 (keeping the graph) with fewer than two classes present.

Differences from the published code, on purpose:
- The published negative mask multiplies the class-c high-entropy mask by the one-hot label of c
  (`high_valid_pixel = onehot * high_mask`), which with the rank condition leaves labeled images without
  negatives and keeps only unlabeled pixels pseudo-labelled c whose teacher ranks c 4th..20th. The spec (and
  the paper) define negatives without that label-c restriction; this follows the spec.
- The queues store L2-normalised teacher features (normalised once per pixel before the push), so the cosine
  with sampled negatives is one batched dot product; the loss is the same as with raw features. Everything is
  fp32 except, when the queue is created with dtype=torch.bfloat16 (half the memory traffic), the dot products
  with the sampled negatives, which then run in bf16 with fp32 accumulation.
- Ties in the teacher's ranking rank the lower class index first (a stable descending sort); the published topk
  left them unspecified. On the device path one stable sort of each pixel's classes orders them, and the
  negatives' rank window is scattered through that order (_rank_window); on CPU a fused C kernel counts each
  class's rank from pairwise compares (native.negative_mask), or, without it, the ranks come from k rounds of a
  max over the fp32 values (a 21-long sort or topk per pixel is several times slower there), where only pixels
  with a tie at the k-th value are redone from (value bits, class index) keys.

How it is computed (same values as the batched [N, C, hw]-mask formulation, measured several times cheaper on CPU):
- prototype and anchor membership are one label per pixel (a pixel belongs to at most its own class): class sums
  by index_add (CPU) or a one-hot bmm (accelerators, deterministic), anchors drawn via a stable sort of the labels
  with the same random draws as a running count over [C, P] would use;
- only the negative mask is per class, built class-major [C, N, hw] (what the queue push consumes);
- the anchor-vs-negative logits, the CE and its gradient w.r.t. the anchors are computed in one pass over the
  sampled negatives (_AnchorLoss), chunk by chunk: the [C*A*K, D] negatives are never materialised and backward
  does not gather them again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import native
from .buffers import constant_arange, reusable_empty, scatter_rows, uniform_below
from .paths import host_path
from .queues import ClassQueues
from .reliability import _order_keys, cpu_single_thread, downsample_nearest
from .fp32 import fp32_region


@dataclass
class ContrastiveMasks:
    """Per-image, per-class pixel masks [N, C, h*w] (bool)."""

    label_low: torch.Tensor  # label == c & low entropy: prototype pixels; "class present" if any
    anchor: torch.Tensor  # label_low & q_c > anchor_threshold
    negative: torch.Tensor  # negative candidates for class c


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor  # 0-dim, fp32
    anchor_index: torch.Tensor  # [C, num_anchors] pixel index p of each sampled anchor
    negative_index: torch.Tensor  # [C, num_anchors * num_negatives] row index into queues.buffer
    class_present: torch.Tensor  # [C] bool
    class_used: torch.Tensor  # [C] bool: present, with anchors and a non-empty queue
    num_present: torch.Tensor  # 0-dim long
    prototype_sums: torch.Tensor  # [C, D] fp32 sum of the teacher features of each class's prototype pixels
    prototype_counts: torch.Tensor  # [C] fp32 (whole numbers): how many

    @property
    def prototypes(self) -> torch.Tensor:
        """[C, D] fp32 mean teacher feature (0 for absent classes). The loss only needs their directions, which the
        sums have: the division is left to whoever reads this."""
        return self.prototype_sums / self.prototype_counts.clamp(min=1)[:, None]


def contrastive_inputs(
    labels_l: torch.Tensor,
    pseudo_u: torch.Tensor,
    low_u: torch.Tensor,
    high_u: torch.Tensor,
    feature_size: tuple[int, int],
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, low and high masks [N_l + N_u, h, w] at feature resolution (nearest), as the published code.

    Labeled pixels count as both low and high entropy when not ignored; `low_u`/`high_u` come from
    `reliability(...)` at crop size, `pseudo_u` is the teacher's (CutMixed) argmax before dropping.
    """
    valid_l = labels_l != ignore_index
    labels = downsample_nearest(torch.cat([labels_l.long(), pseudo_u.long()]), feature_size)
    masks = downsample_nearest(torch.cat([valid_l, low_u.bool(), valid_l, high_u.bool()]), feature_size)
    return labels, *masks.chunk(2)  # low, high: one concatenation and one gather for both


def _rank_keys(prob: torch.Tensor) -> torch.Tensor:
    """[N, C, hw] -> int64 keys in the order of the values, unique within a pixel (ties: lower class first)."""
    num_classes = prob.shape[1]
    shift = max(1, (num_classes - 1).bit_length())
    tie_break = constant_arange(num_classes, prob.device, descending=True)[None, :, None]  # lower class: larger key
    return _order_keys(prob).long().mul_(1 << shift).add_(tie_break)


def _top_mask(keys: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """[N, C, hw] keys -> bool [N, C, hw], True for the k largest (smallest) classes of each pixel.

    k rounds of max over the class dim, each below the previous one; no topk/argmax over a 21-long dim, which is
    several times slower on CPU. The complement is used when k > C / 2. Exact when the keys are unique within a
    pixel (_rank_keys); float values work too, but a pixel whose k-th value is tied then gets more than k.
    """
    num_classes = keys.shape[1]
    if k > num_classes - k:
        return ~_top_mask(keys, num_classes - k, not largest)
    if k <= 0:
        return torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    if not largest:
        # the k smallest are the k largest of an order-reversing map: -x for floats, ~x (= -x - 1, no overflow)
        # for integer keys, whose amin over the class dim is much slower than amax on CPU
        flipped = keys.neg() if keys.is_floating_point() else torch.bitwise_not(keys)
        return _top_mask(flipped, k, largest=True)
    lowest = float("-inf") if keys.is_floating_point() else torch.iinfo(keys.dtype).min
    kth = keys.amax(1, keepdim=True)
    for _ in range(k - 1):
        kth = torch.where(keys < kth, keys, lowest).amax(1, keepdim=True)
    return keys >= kth


def _value_top_mask(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """CPU twin of `_top_mask(_rank_keys(values), k, largest)` with the same result: the rounds run over the fp32
    values themselves (half the bytes of the int64 keys, and no key pass; measured 2x faster at VOC shapes).
    A pixel whose k-th value is tied selects more (or, through the complement, fewer) than k classes; those few
    pixels (~1 in 60000 for a softmax) are redone from their keys. Reading the tie count is a host read, which
    costs nothing on CPU."""
    mask = _top_mask(values, k, largest)
    tied = mask.sum(1) != min(max(k, 0), values.shape[1])
    if bool(tied.any()):
        image, pixel = tied.nonzero(as_tuple=True)
        rows = values[image, :, pixel]  # [T, C]
        mask[image, :, pixel] = _top_mask(_rank_keys(rows.t()[None]), k, largest)[0].t()
    return mask


@functools.lru_cache(maxsize=64)
def _window_table(batch: int, num_classes: int, num_labeled: int, low_rank: int, high_rank: int,
                  device: torch.device) -> torch.Tensor:
    """[N, C, 1] bool: whether the class at position j of an image's descending order is a negative candidate's
    rank: j < low_rank in the labeled images, low_rank <= j < high_rank in the unlabeled ones. Built once per
    setting and device (a constant of the step, read only)."""
    with torch.inference_mode(False):  # a cached tensor must stay usable outside inference mode
        position = torch.arange(num_classes, device=device)[None, :, None]
        labeled = (torch.arange(batch, device=device) < num_labeled)[:, None, None]
        return torch.where(labeled, position < low_rank, (position >= low_rank) & (position < high_rank))


def _rank_window(prob: torch.Tensor, label_or_none: torch.Tensor, num_labeled: int, low_rank: int,
                 high_rank: int) -> torch.Tensor:
    """Device path: [N, C, hw] bool, True where class c's rank in its pixel (0 for the largest value, ties to the
    lower class: a stable descending sort) is in the negatives' window, and c is not a labeled pixel's label. Three
    kernels: the sort, one scatter of the window table through the sorted order, and one scatter that clears the
    labeled pixels' own class (`label_or_none` = C, no class, lands in a spare row)."""
    batch, num_classes, pixels = prob.shape
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    table = _window_table(batch, num_classes, num_labeled, low_rank, high_rank, prob.device)
    window = torch.empty(batch, num_classes + 1, pixels, dtype=torch.bool, device=prob.device)
    window[:, :num_classes].scatter_(1, order, table.expand(batch, num_classes, pixels))
    if num_labeled > 0:
        window[:num_labeled].scatter_(1, label_or_none[:num_labeled, None, :], False)
    return window[:, :num_classes]


@dataclass
class _PixelClasses:
    prototype_label: torch.Tensor  # [P] long: label if (label in range & low entropy) else C
    anchor_label: torch.Tensor  # [P] long: prototype_label if q_label > anchor_threshold else C
    negative: torch.Tensor  # [C, N, hw] bool, class-major: negative candidates of class c


def _pixel_classes(
    prob_teacher: torch.Tensor,
    labels: torch.Tensor,
    low_mask: torch.Tensor,
    high_mask: torch.Tensor,
    num_labeled: int,
    anchor_threshold: float,
    negative_threshold: float,
    low_rank: int,
    high_rank: int,
) -> _PixelClasses:
    """The masks of the module docstring in compact form: a pixel is a prototype / anchor pixel of at most one
    class (its label), so those are per-pixel labels; only the negatives need a per-class mask, built class-major
    (what the queue push consumes) without one-hot label tensors. Labels are class ids in [0, C) or an ignore
    value >= C (the config requires data.ignore_index >= data.num_classes)."""
    batch, num_classes, height, width = prob_teacher.shape
    prob = prob_teacher.float().reshape(batch, num_classes, height * width)
    labels = labels.reshape(batch, -1).long()
    low = low_mask.reshape(batch, -1).bool()
    high = high_mask.reshape(batch, -1).bool()

    label_or_none = labels.clamp(max=num_classes)  # C: ignored, no class
    prototype_label = torch.where(low, label_or_none, num_classes)
    q_label = prob.gather(1, label_or_none.clamp(max=num_classes - 1)[:, None])[:, 0]  # any class where none
    anchor_label = torch.where(q_label > anchor_threshold, prototype_label, num_classes)
    if host_path(prob.device):  # CPU: the whole negative mask in one pass in C, where the kernels are built
        negative = native.negative_mask(prob, labels, high, num_labeled, low_rank, high_rank, negative_threshold)
        if negative is not None:
            return _PixelClasses(prototype_label.reshape(-1), anchor_label.reshape(-1), negative)
    candidate = high[:, None, :] & (prob < negative_threshold)  # [N, C, hw]

    if not host_path(prob.device):  # one stable sort of each pixel's classes gives every rank
        window = _rank_window(prob, label_or_none, num_labeled, low_rank, high_rank)
        if torch.compiler.is_compiling():  # one traceable expression (out= into a transposed view is not traceable)
            negative = (candidate & window).transpose(0, 1).contiguous()
        else:  # written through an [N, C, hw] view: no transpose copy
            negative = torch.empty(num_classes, batch, height * width, dtype=torch.bool, device=prob.device)
            torch.logical_and(candidate, window, out=negative.transpose(0, 1))
        return _PixelClasses(prototype_label.reshape(-1), anchor_label.reshape(-1), negative)

    # CPU: rounds of max over the values (_value_top_mask), where a 21-long sort per pixel is several times slower
    top_low = _value_top_mask(prob, min(low_rank, num_classes), largest=True)
    negative = torch.empty(num_classes, batch, height * width, dtype=torch.bool, device=prob.device)
    negative_nc = negative.transpose(0, 1)  # written through an [N, C, hw] view: no transpose copy
    if num_labeled > 0:  # labeled: among the top low_rank, but not the true label
        classes = constant_arange(num_classes, prob.device)[None, :, None]
        not_label = labels[:num_labeled, None, :] != classes
        torch.logical_and(candidate[:num_labeled] & top_low[:num_labeled], not_label, out=negative_nc[:num_labeled])
    if num_labeled < batch:  # unlabeled: ranked in [low_rank, high_rank)
        window = ~top_low[num_labeled:]
        if high_rank < num_classes:
            window &= ~_value_top_mask(prob[num_labeled:], num_classes - high_rank, largest=False)
        torch.logical_and(candidate[num_labeled:], window, out=negative_nc[num_labeled:])
    return _PixelClasses(prototype_label.reshape(-1), anchor_label.reshape(-1), negative)


def _label_mask(pixel_label: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    classes = constant_arange(num_classes, pixel_label.device)[None, :, None]
    return pixel_label.reshape(batch, 1, -1) == classes


def contrastive_masks(
    prob_teacher: torch.Tensor,
    labels: torch.Tensor,
    low_mask: torch.Tensor,
    high_mask: torch.Tensor,
    num_labeled: int,
    anchor_threshold: float = 0.3,
    negative_threshold: float = 1.0,
    low_rank: int = 3,
    high_rank: int = 20,
) -> ContrastiveMasks:
    """Anchor, prototype and negative masks for every class at once (see module docstring), [N, C, h*w] bool.

    For inspection and tests; `contrastive_loss` uses the same masks in compact form without building these.
    """
    batch, num_classes = prob_teacher.shape[:2]
    pixel = _pixel_classes(prob_teacher, labels, low_mask, high_mask, num_labeled, anchor_threshold,
                           negative_threshold, low_rank, high_rank)
    return ContrastiveMasks(
        _label_mask(pixel.prototype_label, batch, num_classes),
        _label_mask(pixel.anchor_label, batch, num_classes),
        pixel.negative.transpose(0, 1),
    )


def _pixel_rows(features: torch.Tensor) -> torch.Tensor:
    """[N, D, h, w] -> [N*h*w, D] (a view when channels-last)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class _GatherRowsCPU(torch.autograd.Function):
    """Rows of a channels-last CPU feature map at flat pixel indices; backward scatters into a reused buffer
    (scatter_rows) instead of filling a fresh feature-map-sized zero tensor every step."""

    @staticmethod
    def forward(ctx, features, pixel_index):
        ctx.save_for_backward(pixel_index)
        ctx.shape = features.shape
        return _pixel_rows(features).index_select(0, pixel_index)

    @staticmethod
    def backward(ctx, grad_rows):
        (pixel_index,) = ctx.saved_tensors
        batch, dim, height, width = ctx.shape
        grad = scatter_rows("gather_pixels_grad", batch * height * width, pixel_index, grad_rows.contiguous())
        return grad.view(batch, height, width, dim).permute(0, 3, 1, 2), None


def _unit_rows(rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.normalize(rows, dim=-1), whose denominator is max(|row|, 1e-12). No autograd: in place. On the CPU host
    path one multiply by the inverse norm (a divide per element costs more there); elsewhere F.normalize's divide
    (three kernels)."""
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min_(1e-12)
    if host_path(rows.device):
        return torch.mul(rows, norm.reciprocal_(), out=out)
    return torch.div(rows, norm, out=out)


def _gather_pixels(features: torch.Tensor, pixel_index: torch.Tensor) -> torch.Tensor:
    """Rows [M, D] of `features` [N, D, h, w] at flat pixel indices, without copying the whole map."""
    if features.is_contiguous(memory_format=torch.channels_last):
        if host_path(features.device) and features.requires_grad and features.dim() == 4:
            return _GatherRowsCPU.apply(features, pixel_index)
        return _pixel_rows(features).index_select(0, pixel_index)
    hw = features.shape[2] * features.shape[3]
    image = torch.div(pixel_index, hw, rounding_mode="floor")
    return features.flatten(2)[image, :, pixel_index - image * hw]


def _count_per_class(pixel_label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[P] labels in 0..C (C = none) -> [C] long counts, without a host sync (unlike bincount on CUDA).

    Host path: an index_add. Device path: a compare-and-sum over [C, P], one reduction (fused when compiled). An
    int64 index_add there is what inductor cannot do with atomics: it falls back to aten's sort-based index_put,
    which serialises the many pixels of each class (most of the compiled method's GPU time in a profile)."""
    if host_path(pixel_label.device):
        counts = torch.zeros(num_classes + 1, dtype=torch.long, device=pixel_label.device)
        return counts.index_add_(0, pixel_label, torch.ones_like(pixel_label))[:num_classes]
    return _label_mask(pixel_label, 1, num_classes)[0].sum(1)


def sample_anchor_index(
    anchor_cp: torch.Tensor, num_anchors: int, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform pixel indices with replacement among each class's candidates: [C, P] bool -> ([C, A], count [C])."""
    running = torch.cumsum(anchor_cp, dim=1, dtype=torch.int32)  # [C, P]
    count = running[:, -1]
    uniform = torch.rand(anchor_cp.shape[0], num_anchors, generator=generator, device=anchor_cp.device,
                         dtype=torch.float64)
    wanted = (uniform * count[:, None]).floor().to(torch.int32)
    wanted = torch.minimum(wanted, (count - 1).clamp(min=0)[:, None]) + 1  # 1-based rank of the chosen pixel
    index = torch.searchsorted(running, wanted)  # first pixel whose running count reaches that rank
    return index.clamp(max=anchor_cp.shape[1] - 1), count


def sample_anchor_index_from_labels(
    anchor_label: torch.Tensor, num_classes: int, num_anchors: int, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_anchor_index` for candidates given as one label per pixel ([P], C = none): the same random draws
    pick the same pixels (the k-th candidate of class c in pixel order), via a stable sort instead of a [C, P]
    running count. A class without candidates gets some valid pixel index (its class is not used)."""
    count = _count_per_class(anchor_label, num_classes)
    # pixels grouped by class, in pixel order; on 8-bit keys (the labels are 0 .. C), a radix sort takes one pass
    # over the digits where int64 keys take eight (measured 5x faster on CPU too)
    keys = anchor_label.to(torch.uint8 if num_classes < 256 else torch.int32)
    order = torch.sort(keys, stable=True).indices
    start = torch.cumsum(count, 0).sub_(count)  # position in `order` of the class's first candidate
    uniform = torch.rand(num_classes, num_anchors, generator=generator, device=anchor_label.device,
                         dtype=torch.float64)
    # floor(u * n) <= n - 1: see uniform_below. The clamp only keeps a class without candidates (whose anchors are
    # not used) inside `order`.
    position = uniform_below(uniform, count[:, None]).add_(start[:, None]).clamp_(max=anchor_label.numel() - 1)
    return order[position], count


# bytes of gathered negatives per chunk: a few MB keeps a chunk in cache on CPU (larger chunks were slower); one
# chunk on accelerators
_CPU_CHUNK_BYTES = 4 << 20
_DEVICE_CHUNK_BYTES = 512 << 20


def _bmm_into(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> None:
    """out[...] = left @ right for a strided view `out` of a larger fp32 tensor: one op (bmm with out=) on an
    accelerator in eager fp32, where a bmm and a copy would be two; a copy where the product has another dtype
    (bf16 queues), is traced (dynamo does not trace a non-contiguous out=) or takes the CPU host path (CPU's bmm
    into a strided out loops over the batch: measured 2.5x slower than bmm and copy at the VOC shapes)."""
    if out.dtype == left.dtype and not host_path(out.device) and not torch.compiler.is_compiling():
        torch.bmm(left, right, out=out)
    else:
        out.copy_(torch.bmm(left, right))


def _negatives_in_chunks(scaled: torch.Tensor, prototypes: torch.Tensor, buffer: torch.Tensor,
                         index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_AnchorLoss's pass over the sampled negatives as torch ops: for anchors `scaled` [M, 1, D] (unit / T) of C
    classes, (log p_0 [M], p_0 - 1 [M], sum_k p_k negative_k [M, D]) of the softmax over [scaled . prototype,
    scaled . negatives]. The negatives are gathered chunk by chunk into one reused buffer, and each chunk's logits,
    softmax and weighted sum are computed while it is in cache (native.anchor_negatives does the same in C)."""
    num_classes, dim = prototypes.shape
    rows, num_negatives = index.shape
    num_anchors = rows // num_classes
    device = scaled.device
    logits = torch.empty(rows, 1, num_negatives + 1, dtype=torch.float32, device=device)
    _bmm_into(scaled.view(num_classes, num_anchors, dim), prototypes[:, :, None],
              logits.view(num_classes, num_anchors, num_negatives + 1)[:, :, :1])
    # A bf16/fp16 queue halves the gather's memory traffic. On accelerators the dot products then run in that
    # dtype (fp32 accumulation); on CPU, where batched bf16 matrix-vector products are slow, each gathered
    # chunk is widened to fp32 while it is in cache.
    widen = device.type == "cpu" and buffer.dtype != torch.float32
    compute_dtype = torch.float32 if widen else buffer.dtype
    scaled_keys = scaled.to(compute_dtype)  # [M, 1, D]
    grad = torch.empty(rows, 1, dim, dtype=compute_dtype, device=device)  # sum_k p_k negative_k
    positive = torch.empty(rows, 1, 1, dtype=torch.float32, device=device)  # p_0 - 1
    chunk_bytes = _CPU_CHUNK_BYTES if device.type == "cpu" else _DEVICE_CHUNK_BYTES
    chunk = max(1, min(rows, chunk_bytes // (num_negatives * dim * buffer.element_size())))
    scratch = reusable_empty("negatives", (chunk * num_negatives, dim), buffer.dtype, device)
    wide = (reusable_empty("negatives_fp32", (chunk * num_negatives, dim), torch.float32, device)
            if widen else None)
    with cpu_single_thread(device):
        for begin in range(0, rows, chunk):
            end = min(rows, begin + chunk)
            size = end - begin
            negatives = torch.index_select(buffer, 0, index[begin:end].reshape(-1),
                                           out=scratch[: size * num_negatives])
            if widen:
                negatives = wide[: size * num_negatives].copy_(negatives)
            negatives = negatives.view(size, num_negatives, dim)
            block = logits[begin:end]  # [size, 1, 1 + K]
            _bmm_into(scaled_keys[begin:end], negatives.transpose(1, 2), block[:, :, 1:])
            log_prob = torch.log_softmax(block, dim=2, out=block)  # in place: the logits are not needed again
            prob = torch.exp(log_prob)
            torch.sub(prob[:, :, :1], 1.0, out=positive[begin:end])
            torch.bmm(prob[:, :, 1:].to(compute_dtype), negatives, out=grad[begin:end])
    # log_softmax in place: the logits hold log p
    return logits[:, 0, 0], positive.view(rows), grad.view(rows, dim)


class _AnchorLoss(torch.autograd.Function):
    """The contrastive loss from the sampled anchors: sum_c weight_c sum_a CE_a, where CE_a is the per-anchor CE
    (target 0) over logits = [u . prototype_c, u . buffer[index]] / temperature and u = a / max(|a|, 1e-12) is the
    L2-normalised anchor (F.normalize).

    The sampled negatives are gathered chunk by chunk into one reused buffer and never materialised as a whole
    [C*A*K, D] tensor (on CPU, where the fused kernels are built, one C pass reads each anchor's negatives straight
    from the queue: native.anchor_negatives); the gradient w.r.t. each unit anchor,
    (1/T) ((p_0 - 1) prototype + sum_k p_k negative_k), is formed in the same pass while the chunk is in cache, so
    backward does not gather again. The normalisation's
    Jacobian, (g - u (u . g)) / |a|, and the class weights are applied in forward too (exact where |a| >= 1e-12 and
    for zero anchors): backward is one multiply by the incoming gradient, where autograd would launch some twenty
    small kernels for the normalisation and the weighted mean (a cost in eager mode on a GPU, which launches each).
    """

    @staticmethod
    def forward(ctx, anchors, prototypes, buffer, index, temperature, weight):
        num_classes, num_anchors, dim = anchors.shape
        rows = num_classes * num_anchors
        index = index.reshape(rows, -1)
        device = anchors.device
        # logits = scaled . key with scaled = u / T = a / (T max(|a|, 1e-12))
        denom = torch.linalg.vector_norm(anchors, dim=-1, keepdim=True).clamp_min_(1e-12).mul_(temperature)
        scaled = torch.div(anchors, denom).view(rows, 1, dim)
        fused = None
        if host_path(device):  # CPU: one pass in C over each anchor's negatives, where the kernels are built
            positive_logit = torch.bmm(scaled.view(num_classes, num_anchors, dim), prototypes[:, :, None])
            fused = native.anchor_negatives(scaled.view(rows, dim), buffer, index, positive_logit.view(rows))
        log_positive, positive, grad = fused if fused is not None else _negatives_in_chunks(scaled, prototypes,
                                                                                            buffer, index)
        # CE_a = -log p_0
        log_positive = log_positive.view(num_classes, num_anchors)
        grad = grad.float().view(num_classes, num_anchors, dim)
        grad.addcmul_(positive.view(num_classes, num_anchors, 1), prototypes[:, None, :])  # g = (dCE / du) x T
        # d loss / d anchor = weight_c / T * (g - u (u . g)) / |a|, where u (u . g) = T^2 scaled (scaled . g)
        scaled = scaled.view(num_classes, num_anchors, dim)
        along = torch.bmm(scaled.view(rows, 1, dim), grad.view(rows, dim, 1)).view(num_classes, num_anchors, 1)
        grad.addcmul_(scaled, along, value=-temperature * temperature)
        grad *= weight[:, None, None] / denom
        ctx.save_for_backward(grad)
        return torch.rsub((log_positive * weight[:, None]).sum(), 0.0)  # 0 - x: +0, not -0, without a used class

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


@dataclass
class ContrastivePrepared:
    """What the contrastive loss computes before the queue push, all without gradients: the pixels' classes, the
    prototype sums and counts, and the rows the push takes (unit teacher features, their class mask [P, C])."""
    pixel: _PixelClasses
    prototype_sums: torch.Tensor
    prototype_counts: torch.Tensor
    class_present: torch.Tensor
    num_present: torch.Tensor
    push_rows: torch.Tensor
    push_mask: torch.Tensor


def contrastive_prepare(
    rep_teacher: torch.Tensor,
    prob_teacher: torch.Tensor,
    labels: torch.Tensor,
    low_mask: torch.Tensor,
    high_mask: torch.Tensor,
    num_labeled: int,
    queue_dtype: torch.dtype,
    *,
    anchor_threshold: float,
    negative_threshold: float,
    low_rank: int,
    high_rank: int,
) -> ContrastivePrepared:
    """The part of `contrastive_loss` before the queue push (see there, and its defaults)."""
    dim = rep_teacher.shape[1]
    num_classes = prob_teacher.shape[1]
    with fp32_region(rep_teacher.device), torch.no_grad():
        pixel = _pixel_classes(prob_teacher, labels, low_mask, high_mask, num_labeled, anchor_threshold,
                               negative_threshold, low_rank, high_rank)
        teacher = rep_teacher.detach().float()
        rows = _pixel_rows(teacher)  # [P, D]: a view when channels-last
        # prototypes: mean teacher feature per class over its low-entropy pixels
        fused = None
        if host_path(teacher.device):  # the unit rows for the queues, the sums and the counts in one pass in C
            fused = native.prepare_rows(rows, pixel.prototype_label, num_classes, queue_dtype)
        if fused is not None:
            unit_rows, sums, pixels_per_class = fused[0], fused[1], fused[2].float()
        elif host_path(teacher.device):
            pixels_per_class = _count_per_class(pixel.prototype_label, num_classes).float()
            sums = torch.zeros(num_classes + 1, dim, dtype=torch.float32)
            sums = sums.index_add_(0, pixel.prototype_label, rows)[:num_classes]
        else:  # deterministic (no atomics): one-hot [C, P] @ rows [P, D]; the comparison writes the one-hot as
            # fp32 (out=), whose row sums are the counts
            one_hot = torch.empty(num_classes, pixel.prototype_label.numel(), dtype=torch.float32,
                                  device=teacher.device)
            torch.eq(pixel.prototype_label[None, :], constant_arange(num_classes, teacher.device)[:, None],
                     out=one_hot)
            pixels_per_class = one_hot.sum(1)
            sums = torch.mm(one_hot, rows)
        class_present = pixels_per_class > 0
        if fused is None:
            unit_rows = _unit_rows(rows, out=reusable_empty("push_rows", tuple(rows.shape), rows.dtype, rows.device))
        negative_pc = pixel.negative.reshape(num_classes, -1).t()  # [P, C] view of a class-major tensor
        return ContrastivePrepared(pixel, sums, pixels_per_class, class_present, class_present.sum(),
                                   unit_rows.to(queue_dtype), negative_pc)


def push_prepared(prepared: ContrastivePrepared, queues: ClassQueues, group=None) -> None:
    """Between `contrastive_prepare` and `contrastive_finish`: the negatives of every class go to the shared queues
    before sampling (one collective)."""
    with fp32_region(prepared.push_rows.device), torch.no_grad():
        queues.push_distributed(prepared.push_rows, prepared.push_mask, group=group)


def contrastive_finish(
    rep: torch.Tensor,
    prepared: ContrastivePrepared,
    queues: ClassQueues,
    *,
    num_anchors: int,
    num_negatives: int,
    temperature: float,
    generator: Optional[torch.Generator],
) -> ContrastiveOutput:
    """The part of `contrastive_loss` after the queue push (see there, and its defaults): sampling and the anchors'
    loss."""
    dim = rep.shape[1]
    num_classes = prepared.prototype_sums.shape[0]
    pixel, class_present, num_present = prepared.pixel, prepared.class_present, prepared.num_present
    with fp32_region(rep.device), torch.no_grad():
        anchor_index, anchor_count = sample_anchor_index_from_labels(pixel.anchor_label, num_classes, num_anchors,
                                                                     generator)
        negative_index, queue_nonempty = queues.sample_indices(num_anchors * num_negatives, generator=generator)
        class_used = (anchor_count > 0) & queue_nonempty  # a class with anchors is present (anchors are low)
        prototypes_unit = F.normalize(prepared.prototype_sums, dim=1)  # the mean's direction
        # loss = sum over used classes of the mean anchor CE / number of classes present; 0 with fewer than two
        # present (still attached to rep through the clamped anchor gather)
        class_weight = class_used / torch.where(num_present >= 2, num_present * float(num_anchors), float("inf"))

    with fp32_region(rep.device):
        anchors = _gather_pixels(rep, anchor_index.reshape(-1)).float().reshape(num_classes, num_anchors, dim)
        loss = _AnchorLoss.apply(anchors, prototypes_unit, queues.buffer, negative_index, temperature, class_weight)
    return ContrastiveOutput(loss, anchor_index, negative_index, class_present, class_used, num_present,
                             prepared.prototype_sums, prepared.prototype_counts)


def contrastive_loss(
    rep: torch.Tensor,
    rep_teacher: torch.Tensor,
    prob_teacher: torch.Tensor,
    labels: torch.Tensor,
    low_mask: torch.Tensor,
    high_mask: torch.Tensor,
    num_labeled: int,
    queues: ClassQueues,
    *,
    anchor_threshold: float = 0.3,
    negative_threshold: float = 1.0,
    low_rank: int = 3,
    high_rank: int = 20,
    num_anchors: int = 256,
    num_negatives: int = 50,
    temperature: float = 0.5,
    generator: Optional[torch.Generator] = None,
    group=None,
) -> ContrastiveOutput:
    """U2PL contrastive loss (spec section 6). Pushes this step's negatives to `queues` (all ranks), then samples.

    rep [N, D, h, w] student features (grad), rep_teacher [N, D, h, w], prob_teacher [N, C, h, w] teacher softmax,
    labels [N, h, w] (true labels for the first `num_labeled` images, pseudo-labels after; ignore 255),
    low_mask / high_mask [N, h, w] bool (see contrastive_inputs). Channels-last features avoid copies.
    In three parts: `contrastive_prepare` (no gradients), the push of its rows to the shared queues (one
    collective), `contrastive_finish` (train.compile_method_mode=cuda-graph captures the first and last apart).
    """
    prepared = contrastive_prepare(rep_teacher, prob_teacher, labels, low_mask, high_mask, num_labeled, queues.dtype,
                                   anchor_threshold=anchor_threshold, negative_threshold=negative_threshold,
                                   low_rank=low_rank, high_rank=high_rank)
    push_prepared(prepared, queues, group)
    return contrastive_finish(rep, prepared, queues, num_anchors=num_anchors, num_negatives=num_negatives,
                              temperature=temperature, generator=generator)
