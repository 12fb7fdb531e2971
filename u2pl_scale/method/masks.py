"""Which pixels of a step are a class's prototype pixels, anchor candidates and negative candidates (U2PL_SPEC.md
section 6, published compute_contra_memobank_loss), for every class at once with fixed shapes and no host sync.

Pixels are indexed p = n*h*w + y*w + x over the labeled + unlabeled batch at feature resolution (stride 4).
For class c:
- anchor candidates: label == c, low entropy, teacher q_c > anchor_threshold;
- prototype pixels: label == c & low entropy;
- negatives: high entropy, q_c < negative_threshold and
  unlabeled: c ranked in [low_rank, high_rank) of the teacher's sorted q;
  labeled:   c in the teacher's top low_rank and c != the true label.

A pixel is a prototype / anchor pixel of at most one class (its label), so those are one label per pixel; only the
negatives are a per-class mask, built class-major [C, N, hw] (what the queue push consumes).

Differences from the published code, on purpose:
- The published negative mask multiplies the class-c high-entropy mask by the one-hot label of c
  (`high_valid_pixel = onehot * high_mask`), which with the rank condition leaves labeled images without
  negatives and keeps only unlabeled pixels pseudo-labelled c whose teacher ranks c 4th..20th. The spec (and
  the paper) define negatives without that label-c restriction; this follows the spec.
- Ties in the teacher's ranking rank the lower class index first (a stable descending sort); the published topk
  left them unspecified. One stable sort of each pixel's classes orders them, and the negatives' rank window is
  scattered through that order (_rank_window).

`negative_mask` is a stage that u2pl_scale/accel may replace (method/stages.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reliability import downsample_nearest, nearest_source_index

@dataclass
class ContrastiveMasks:
    """Per-image, per-class pixel masks [N, C, h*w] (bool)."""

    label_low: torch.Tensor  # label == c & low entropy: prototype pixels; "class present" if any
    anchor: torch.Tensor  # label_low & q_c > anchor_threshold
    negative: torch.Tensor  # negative candidates for class c


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
    source = nearest_source_index(tuple(labels_l.shape[1:]), tuple(feature_size), labels_l.device)
    labels = downsample_nearest(torch.cat([labels_l.long(), pseudo_u.long()]), feature_size, source)
    masks = downsample_nearest(torch.cat([valid_l, low_u.bool(), valid_l, high_u.bool()]), feature_size, source)
    return labels, *masks.chunk(2)  # low, high: one concatenation and one gather for both


def _window_table(batch: int, num_classes: int, num_labeled: int, low_rank: int, high_rank: int,
                  device: torch.device) -> torch.Tensor:
    """[N, C, 1] bool: whether the class at position j of an image's descending order is a negative candidate's
    rank: j < low_rank in the labeled images, low_rank <= j < high_rank in the unlabeled ones."""
    position = torch.arange(num_classes, device=device)[None, :, None]
    labeled = (torch.arange(batch, device=device) < num_labeled)[:, None, None]
    return torch.where(labeled, position < low_rank, (position >= low_rank) & (position < high_rank))


def _rank_window(prob: torch.Tensor, label_or_none: torch.Tensor, num_labeled: int, low_rank: int,
                 high_rank: int) -> torch.Tensor:
    """[N, C, hw] bool, True where class c's rank in its pixel (0 for the largest value, ties to the
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


def negative_mask(prob: torch.Tensor, labels: torch.Tensor, high: torch.Tensor, num_labeled: int, low_rank: int,
                  high_rank: int, negative_threshold: float) -> torch.Tensor:
    """Stage: [C, N, hw] bool, class-major (what the queue push consumes), the negative candidates of each class:
    high-entropy pixels with q_c < negative_threshold whose rank of c is in the window (labeled images: c among the
    top low_rank and not the label; unlabeled: rank in [low_rank, high_rank)). prob [N, C, hw] fp32, labels [N, hw]
    long (an ignore value >= C for no class), high [N, hw] bool."""
    num_classes = prob.shape[1]
    candidate = high[:, None, :] & (prob < negative_threshold)  # [N, C, hw]
    window = _rank_window(prob, labels.clamp(max=num_classes), num_labeled, low_rank, high_rank)
    return (candidate & window).transpose(0, 1).contiguous()


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
    negatives=negative_mask,
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
    negative = negatives(prob, labels, high, num_labeled, low_rank, high_rank, negative_threshold)
    return _PixelClasses(prototype_label.reshape(-1), anchor_label.reshape(-1), negative)


def _label_mask(pixel_label: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    classes = torch.arange(num_classes, device=pixel_label.device)[None, :, None]
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
    stages: "Stages | None" = None,  # noqa: F821  (method/stages.py; None: the reference stages of this module)
) -> ContrastiveMasks:
    """Anchor, prototype and negative masks for every class at once (see module docstring), [N, C, h*w] bool.

    For inspection and tests; `contrastive_loss` uses the same masks in compact form without building these.
    """
    batch, num_classes = prob_teacher.shape[:2]
    pixel = _pixel_classes(prob_teacher, labels, low_mask, high_mask, num_labeled, anchor_threshold,
                           negative_threshold, low_rank, high_rank,
                           stages.negative_mask if stages is not None else negative_mask)
    return ContrastiveMasks(
        _label_mask(pixel.prototype_label, batch, num_classes),
        _label_mask(pixel.anchor_label, batch, num_classes),
        pixel.negative.transpose(0, 1),
    )
