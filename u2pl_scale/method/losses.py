"""Supervised, OHEM and unsupervised (reliable pseudo-label) losses (U2PL_SPEC.md sections 3-5).

All losses are computed in fp32 even under autocast, on device, without host syncs: counts stay tensors and
data-dependent choices are `torch.where`s. Where the published code would divide by zero (no pixel left) these
return 0 (with a graph) instead of NaN. `scaled_ce_sum` is a stage that u2pl_scale/accel may replace
(method/stages.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fp32 import fp32_region
from .reliability import Number, drop_unreliable, entropy_from_logits, percentile


def _ce_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum of per-pixel cross-entropy over non-ignored pixels, fp32."""
    with fp32_region(logits.device):
        return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="sum")


def ce_mean(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels; 0 (with a graph) when every pixel is ignored."""
    count = (target != ignore_index).sum()
    return _ce_sum(logits, target, ignore_index) / count.clamp(min=1)


def sup_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    aux_logits: Optional[torch.Tensor] = None,
    aux_weight: float = 0.4,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Supervised CE at crop size, plus `aux_weight` x CE of the auxiliary head when given (spec sections 1, 5)."""
    loss = ce_mean(logits, target, ignore_index)
    if aux_logits is not None:
        loss = loss + aux_weight * ce_mean(aux_logits, target, ignore_index)
    return loss


def ohem_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Online hard example mining CE, as the published OhemCrossEntropy2dTensor (spec section 5).

    p = softmax probability of the true class per valid pixel. If fewer than `min_kept` pixels are valid all are
    kept; otherwise threshold = max(thresh, the min_kept-th smallest p) and valid pixels with p <= threshold are
    kept. CE is averaged over kept pixels. The k-th value uses kthvalue with a static k, so nothing syncs.
    """
    with fp32_region(logits.device):
        logits = logits.float()
        target = target.long()
        valid = target != ignore_index
        if min_kept > 0:
            with torch.no_grad():
                safe_target = torch.where(valid, target, torch.zeros_like(target))
                true_prob = torch.softmax(logits, dim=1).gather(1, safe_target[:, None])[:, 0]
                true_prob = torch.where(valid, true_prob, torch.ones_like(true_prob))  # ignored pixels sort last
                flat = true_prob.reshape(-1)
                kth_smallest = torch.kthvalue(flat, min(flat.numel(), min_kept)).values
                threshold = torch.clamp(kth_smallest, min=thresh)
                hard = valid & (true_prob <= threshold)
                keep = torch.where(valid.sum() < min_kept, valid, hard)
            target = torch.where(keep, target, torch.full_like(target, ignore_index))
        return ce_mean(logits, target, ignore_index)


def scaled_ce_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, scale: torch.Tensor) -> torch.Tensor:
    """`scale` x the sum of per-pixel CE over the non-ignored pixels, fp32."""
    return _ce_sum(logits, target, ignore_index) * scale


def unsup_loss_from_reliable(
    student_logits_u: torch.Tensor, reliable_labels: torch.Tensor, kept_count: torch.Tensor,
    valid_count: torch.Tensor, ignore_index: int = 255,
    stages: "Stages | None" = None,  # noqa: F821  (method/stages.py; None: scaled_ce_sum above)
) -> torch.Tensor:
    """`(valid / kept) * CE(mean over kept)`, the published compute_unsupervised_loss's `(B*H*W / kept)` (spec
    section 4) with both counts over the same pixels: the published code has no ignored pseudo-label, so its
    B*H*W are its valid pixels; here padding is ignored and must not count, or the loss grows with it."""
    scale = valid_count.detach().float() / kept_count.detach().clamp(min=1).float() ** 2  # valid / kept^2, fp32
    ce_sum = stages.scaled_ce_sum if stages is not None else scaled_ce_sum
    return ce_sum(student_logits_u, reliable_labels, ignore_index, scale)


def unsup_loss(
    student_logits_u: torch.Tensor,
    pseudo_labels: torch.Tensor,
    teacher_logits_u: torch.Tensor,
    drop_percent: Number,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsupervised loss on reliable pseudo-labels (spec section 4, published compute_unsupervised_loss).

    Entropy of softmax(teacher_logits_u); threshold = percentile (100 - drop_percent) over non-ignored pixels;
    non-ignored pixels with H >= threshold are dropped; loss = (valid / kept) * mean CE over kept.
    Returns (loss, reliable ratio kept/valid as a 0-dim tensor for logging). `pseudo_labels` is not modified.
    When the step already has a `reliability(...)` result, use `unsup_loss_from_reliable` to reuse its sort.
    """
    with torch.no_grad():
        entropy_map = entropy_from_logits(teacher_logits_u.detach())
        valid = pseudo_labels != ignore_index
        threshold = percentile(entropy_map, valid, 100.0 - drop_percent)
        reliable_labels, kept_count = drop_unreliable(pseudo_labels, entropy_map, threshold, ignore_index)
        valid_count = valid.sum()
        ratio = kept_count.float() / valid_count.clamp(min=1).float()
    return unsup_loss_from_reliable(student_logits_u, reliable_labels, kept_count, valid_count, ignore_index), ratio
