"""Contrastive loss with unreliable pixels as negatives (U2PL_SPEC.md section 6, published
compute_contra_memobank_loss), batched over classes with fixed shapes and no host sync.

Which pixels are each class's prototype pixels, anchors and negatives: method/masks.py. All negatives are pushed (one
collective for all classes) into the ClassQueues before sampling. For every class present (has label == c & low
pixels) with anchors and a non-empty queue: num_anchors anchors with replacement (u * count -> searchsorted in the
class's running count), num_anchors * num_negatives queue rows with replacement, logits = cosine(anchor,
[prototype, negatives]) / temperature, CE with target 0. Prototype: the mean teacher feature of the class's
prototype pixels (no grad). Loss = sum over those classes / number of classes present, and 0 (keeping the graph)
with fewer than two classes present.

Differences from the published code, on purpose: the queues store L2-normalised teacher features (normalised once
per pixel before the push), so the cosine with sampled negatives is one batched dot product; the loss is the same as
with raw features. Everything is fp32 except, when the queue is created with dtype=torch.bfloat16 (half the memory
traffic), the dot products with the sampled negatives, which then run in bf16 with fp32 accumulation.

How it is computed (same values as the batched [N, C, hw]-mask formulation, and cheaper):
- prototype and anchor membership are one label per pixel: class sums by a one-hot matrix product
  (deterministic: no atomics), anchors drawn via a stable sort of the labels with the same random draws as a
  running count over [C, P] would use;
- the anchor-vs-negative logits, the CE and its gradient w.r.t. the anchors are computed in one pass over the
  sampled negatives (_AnchorLoss), chunk by chunk: the [C*A*K, D] negatives are never materialised and backward
  does not gather them again.

`prototype_rows`, `gather_pixels` and `anchor_negatives` are stages that u2pl_scale/accel may replace
(method/stages.py), as is the masks' `negative_mask`: the functions below take them from their `stages` argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .fp32 import fp32_region
from .masks import ContrastiveMasks, contrastive_inputs, contrastive_masks  # noqa: F401  (re-exported)
from .masks import _label_mask, _PixelClasses, _pixel_classes, negative_mask
from .queues import ClassQueues, uniform_below


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


def pixel_rows(features: torch.Tensor) -> torch.Tensor:
    """[N, D, h, w] -> [N*h*w, D] (a view when channels-last)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """F.normalize(rows, dim=-1): rows / max(|row|, 1e-12)."""
    return torch.div(rows, torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min_(1e-12))


def gather_pixels(features: torch.Tensor, pixel_index: torch.Tensor) -> torch.Tensor:
    """Stage: rows [M, D] of `features` [N, D, h, w] at flat pixel indices, without copying the whole map."""
    if features.is_contiguous(memory_format=torch.channels_last):
        return pixel_rows(features).index_select(0, pixel_index)
    hw = features.shape[2] * features.shape[3]
    image = torch.div(pixel_index, hw, rounding_mode="floor")
    return features.flatten(2)[image, :, pixel_index - image * hw]


def _count_per_class(pixel_label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[P] labels in 0..C (C = none) -> [C] long counts, without a host sync (unlike bincount on CUDA): a
    compare-and-sum over [C, P], one reduction (fused when compiled). An int64 index_add is what inductor cannot do
    with atomics: it falls back to aten's sort-based index_put, which serialises the many pixels of each class."""
    return _label_mask(pixel_label, 1, num_classes)[0].sum(1)


def prototype_rows(rows: torch.Tensor, prototype_label: torch.Tensor, num_classes: int,
                   queue_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage: the teacher's pixel rows [P, D] fp32 -> (unit rows in the queue dtype for the push, the prototype
    sums [C, D] fp32 and counts [C] fp32 of the pixels labelled c, prototype_label C = none). Deterministic (no
    atomics): one-hot [C, P] @ rows [P, D], the one-hot written as fp32 by the comparison, whose row sums are the
    counts."""
    one_hot = torch.empty(num_classes, prototype_label.numel(), dtype=torch.float32, device=rows.device)
    torch.eq(prototype_label[None, :], torch.arange(num_classes, device=rows.device)[:, None], out=one_hot)
    return unit_rows(rows).to(queue_dtype), torch.mm(one_hot, rows), one_hot.sum(1)


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


# bytes of gathered negatives per chunk of anchor_negatives
CHUNK_BYTES = 512 << 20


def anchor_negatives(scaled: torch.Tensor, prototypes: torch.Tensor, buffer: torch.Tensor,
                     index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage: _AnchorLoss's pass over the sampled negatives. For anchors `scaled` [M, 1, D] (unit / T) of C
    classes, (log p_0 [M], p_0 - 1 [M], sum_k p_k negative_k [M, D]) of the softmax over [scaled . prototype,
    scaled . negatives], negatives = buffer[index] ([M, K] rows of the queues). The negatives are gathered chunk by
    chunk and each chunk's logits, softmax and weighted sum are computed while it is at hand. With a bf16/fp16
    queue (half the gather's memory traffic) the dot products run in that dtype with fp32 accumulation."""
    num_classes, dim = prototypes.shape
    rows, num_negatives = index.shape
    num_anchors = rows // num_classes
    logits = torch.empty(rows, 1, num_negatives + 1, dtype=torch.float32, device=scaled.device)
    logits.view(num_classes, num_anchors, num_negatives + 1)[:, :, :1].copy_(
        torch.bmm(scaled.view(num_classes, num_anchors, dim), prototypes[:, :, None]))
    keys = scaled.to(buffer.dtype)
    grad = torch.empty(rows, 1, dim, dtype=buffer.dtype, device=scaled.device)  # sum_k p_k negative_k
    positive = torch.empty(rows, 1, 1, dtype=torch.float32, device=scaled.device)  # p_0 - 1
    chunk = max(1, min(rows, CHUNK_BYTES // (num_negatives * dim * buffer.element_size())))
    for begin in range(0, rows, chunk):
        end = min(rows, begin + chunk)
        negatives = buffer[index[begin:end].reshape(-1)].view(end - begin, num_negatives, dim)
        block = logits[begin:end]  # [size, 1, 1 + K]
        block[:, :, 1:].copy_(torch.bmm(keys[begin:end], negatives.transpose(1, 2)))
        log_prob = torch.log_softmax(block, dim=2, out=block)  # in place: the logits are not needed again
        prob = torch.exp(log_prob)
        torch.sub(prob[:, :, :1], 1.0, out=positive[begin:end])
        torch.bmm(prob[:, :, 1:].to(buffer.dtype), negatives, out=grad[begin:end])
    # log_softmax in place: the logits hold log p
    return logits[:, 0, 0], positive.view(rows), grad.view(rows, dim)


class _AnchorLoss(torch.autograd.Function):
    """The contrastive loss from the sampled anchors: sum_c weight_c sum_a CE_a, where CE_a is the per-anchor CE
    (target 0) over logits = [u . prototype_c, u . buffer[index]] / temperature and u = a / max(|a|, 1e-12) is the
    L2-normalised anchor (F.normalize).

    The sampled negatives are gathered chunk by chunk and never materialised as a whole [C*A*K, D] tensor
    (`negatives`: the anchor_negatives stage); the gradient w.r.t. each unit anchor,
    (1/T) ((p_0 - 1) prototype + sum_k p_k negative_k), is formed in the same pass while the chunk is in cache, so
    backward does not gather again. The normalisation's
    Jacobian, (g - u (u . g)) / |a|, and the class weights are applied in forward too (exact where |a| >= 1e-12 and
    for zero anchors): backward is one multiply by the incoming gradient, where autograd would launch some twenty
    small kernels for the normalisation and the weighted mean (a cost in eager mode on a GPU, which launches each).
    """

    @staticmethod
    def forward(ctx, anchors, prototypes, buffer, index, temperature, weight, negatives):
        num_classes, num_anchors, dim = anchors.shape
        rows = num_classes * num_anchors
        index = index.reshape(rows, -1)
        # logits = scaled . key with scaled = u / T = a / (T max(|a|, 1e-12))
        denom = torch.linalg.vector_norm(anchors, dim=-1, keepdim=True).clamp_min_(1e-12).mul_(temperature)
        scaled = torch.div(anchors, denom).view(rows, 1, dim)
        log_positive, positive, grad = negatives(scaled, prototypes, buffer, index)
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
        return grad * grad_output, None, None, None, None, None, None


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
    stages: "Stages | None" = None,  # noqa: F821
) -> ContrastivePrepared:
    """The part of `contrastive_loss` before the queue push (see there, and its defaults)."""
    num_classes = prob_teacher.shape[1]
    with fp32_region(rep_teacher.device), torch.no_grad():
        pixel = _pixel_classes(prob_teacher, labels, low_mask, high_mask, num_labeled, anchor_threshold,
                               negative_threshold, low_rank, high_rank,
                               stages.negative_mask if stages is not None else negative_mask)
        rows = pixel_rows(rep_teacher.detach().float())  # [P, D]: a view when channels-last
        # prototypes: mean teacher feature per class over its low-entropy pixels; unit rows for the queues
        prototypes_of = stages.prototype_rows if stages is not None else prototype_rows
        push_rows, sums, pixels_per_class = prototypes_of(rows, pixel.prototype_label, num_classes, queue_dtype)
        class_present = pixels_per_class > 0
        negative_pc = pixel.negative.reshape(num_classes, -1).t()  # [P, C] view of a class-major tensor
        return ContrastivePrepared(pixel, sums, pixels_per_class, class_present, class_present.sum(), push_rows,
                                   negative_pc)


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
    stages: "Stages | None" = None,  # noqa: F821
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
        gather = stages.gather_pixels if stages is not None else gather_pixels
        negatives = stages.anchor_negatives if stages is not None else anchor_negatives
        anchors = gather(rep, anchor_index.reshape(-1)).float()
        loss = _AnchorLoss.apply(anchors.reshape(num_classes, num_anchors, dim), prototypes_unit, queues.buffer,
                                 negative_index, temperature, class_weight, negatives)
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
    stages: "Stages | None" = None,  # noqa: F821  (method/stages.py; None: the reference stages of this module)
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
                                   low_rank=low_rank, high_rank=high_rank, stages=stages)
    push_prepared(prepared, queues, group)
    return contrastive_finish(rep, prepared, queues, num_anchors=num_anchors, num_negatives=num_negatives,
                              temperature=temperature, generator=generator, stages=stages)
