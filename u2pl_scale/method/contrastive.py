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
- Ranks come from topk (top low_rank, bottom C - high_rank) instead of a full sort; only ties order differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .queues import ClassQueues
from .reliability import downsample_nearest


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
    prototypes: torch.Tensor  # [C, D] fp32 mean teacher feature (0 for absent classes)


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
    low = downsample_nearest(torch.cat([valid_l, low_u.bool()]), feature_size)
    high = downsample_nearest(torch.cat([valid_l, high_u.bool()]), feature_size)
    return labels, low, high


def _rank_mask(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, k, hw] class indices -> [N, C, hw] bool, True for the listed classes."""
    mask = torch.zeros(indices.shape[0], num_classes, indices.shape[2], dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)


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
    """Anchor, prototype and negative masks for every class at once (see module docstring)."""
    batch, num_classes, height, width = prob_teacher.shape
    prob = prob_teacher.float().reshape(batch, num_classes, height * width)
    classes = torch.arange(num_classes, device=prob.device)[None, :, None]
    label_is_c = labels.reshape(batch, 1, -1) == classes
    low = low_mask.reshape(batch, 1, -1).bool()
    high = high_mask.reshape(batch, 1, -1).bool()

    label_low = label_is_c & low
    anchor = label_low & (prob > anchor_threshold)

    top_low = _rank_mask(prob.topk(min(low_rank, num_classes), dim=1).indices, num_classes)
    if high_rank < num_classes:
        beyond_high = _rank_mask(prob.topk(num_classes - high_rank, dim=1, largest=False).indices, num_classes)
        rank_window = ~top_low & ~beyond_high  # ranks [low_rank, high_rank)
    else:
        rank_window = ~top_low
    is_labeled = (torch.arange(batch, device=prob.device) < num_labeled)[:, None, None]
    class_condition = torch.where(is_labeled, top_low & ~label_is_c, rank_window)
    negative = high & (prob < negative_threshold) & class_condition
    return ContrastiveMasks(label_low, anchor, negative)


def _class_major(mask: torch.Tensor) -> torch.Tensor:
    """[N, C, hw] -> contiguous [C, N*hw] (pixel index p = n*hw + s)."""
    return mask.transpose(0, 1).reshape(mask.shape[1], -1)


def _pixel_rows(features: torch.Tensor) -> torch.Tensor:
    """[N, D, h, w] -> [N*h*w, D] (a view when channels-last)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _gather_pixels(features: torch.Tensor, pixel_index: torch.Tensor) -> torch.Tensor:
    """Rows [M, D] of `features` [N, D, h, w] at flat pixel indices, without copying the whole map."""
    if features.is_contiguous(memory_format=torch.channels_last):
        return _pixel_rows(features).index_select(0, pixel_index)
    hw = features.shape[2] * features.shape[3]
    image = torch.div(pixel_index, hw, rounding_mode="floor")
    return features.flatten(2)[image, :, pixel_index - image * hw]


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
    """
    batch, dim, height, width = rep.shape
    num_classes = prob_teacher.shape[1]
    with torch.autocast(rep.device.type, enabled=False), torch.no_grad():
        masks = contrastive_masks(prob_teacher, labels, low_mask, high_mask, num_labeled, anchor_threshold,
                                  negative_threshold, low_rank, high_rank)
        teacher = rep_teacher.detach().float()
        # prototypes: per-image [C, hw] @ [hw, D], summed over images
        teacher_rows = teacher.flatten(2).transpose(1, 2)  # [N, hw, D] (contiguous when channels-last)
        label_low = masks.label_low.float()
        pixels_per_class = label_low.sum(dim=(0, 2))
        prototypes = torch.bmm(label_low, teacher_rows).sum(0) / pixels_per_class.clamp(min=1)[:, None]
        class_present = pixels_per_class > 0
        num_present = class_present.sum()

        # negatives of every class go to the shared queues before sampling (one collective)
        negative_pc = _class_major(masks.negative).t()  # [P, C] view of a class-major tensor
        queues.push_distributed(F.normalize(_pixel_rows(teacher), dim=1).to(queues.dtype), negative_pc, group=group)

        anchor_index, anchor_count = sample_anchor_index(_class_major(masks.anchor), num_anchors, generator)
        negative_index, queue_nonempty = queues.sample_indices(num_anchors * num_negatives, generator=generator)
        class_used = class_present & (anchor_count > 0) & queue_nonempty
        # negatives stay in the queue's storage dtype (fp32 by default); a bf16 queue gives bf16 dot products
        negatives = queues.buffer.index_select(0, negative_index.reshape(-1))
        negatives = negatives.reshape(num_classes * num_anchors, num_negatives, dim)
        prototypes_unit = F.normalize(prototypes, dim=1)

    with torch.autocast(rep.device.type, enabled=False):
        anchors = _gather_pixels(rep, anchor_index.reshape(-1)).float()
        anchors = F.normalize(anchors, dim=1).reshape(num_classes, num_anchors, dim)
        positive = (anchors * prototypes_unit[:, None, :]).sum(-1, keepdim=True)  # [C, A, 1]
        anchor_columns = anchors.reshape(-1, dim, 1).to(negatives.dtype)
        negative = torch.bmm(negatives, anchor_columns).float().reshape(num_classes, num_anchors, num_negatives)
        logits = torch.cat([positive, negative], dim=2) / temperature
        per_anchor = torch.logsumexp(logits, dim=2) - logits[:, :, 0]  # CE with target 0
        per_class = per_anchor.mean(dim=1)
        total = torch.where(class_used, per_class, torch.zeros_like(per_class)).sum()
        # < 2 classes present: 0, still attached to rep through the (clamped) anchor gather
        loss = torch.where(num_present >= 2, total / num_present.clamp(min=1), total * 0.0)
    return ContrastiveOutput(loss, anchor_index, negative_index, class_present, class_used, num_present, prototypes)
