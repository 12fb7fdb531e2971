"""Supervised, OHEM and unsupervised (reliable pseudo-label) losses (U2PL_SPEC.md sections 3-5).

All losses are computed in fp32 even under autocast, on device, without host syncs: counts stay tensors and
data-dependent choices are `torch.where`s. Where the published code would divide by zero (no pixel left) these
return 0 (with a graph) instead of NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import native
from .paths import host_path
from .reliability import Number, cpu_row_chunks, cpu_single_thread, drop_unreliable, entropy_from_logits, percentile
from .buffers import reusable_empty
from .fp32 import fp32_region


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


class _ScaledCESumCPU(torch.autograd.Function):
    """`scale` x the sum of per-pixel CE over non-ignored pixels of fp32 CPU logits [B, C, H, W], fused: the
    log_softmax of each whole image is written straight into the gradient buffer, then, in cache-sized row blocks,
    the loss is read from it and it is turned in place into the gradient scale * (softmax - onehot) (0 on ignored
    pixels), which is saved, so backward only hands it on (no log_softmax / nll backward passes, and no extra
    logits-sized pass when the incoming gradient is 1). Channels-last logits are made contiguous first: a class
    reduction over channels-last blocks costs a copy per block (the trainer upsamples contiguous logits). Where the
    fused CPU kernels are built, native.ce_grad does all of it in one pass over each pixel row."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, scale):
        logits = logits.contiguous()
        grad = reusable_empty("unsup_ce_grad", tuple(logits.shape), torch.float32, logits.device)
        total = native.ce_grad(logits, target.long(), ignore_index, scale.item(), grad)  # one pass in C
        if total is not None:
            ctx.save_for_backward(grad)
            return scale * total
        for b in range(logits.shape[0]):
            torch.log_softmax(logits[b], dim=0, out=grad[b])
        partial = []
        with cpu_single_thread(logits.device):
            for b, top, bottom in cpu_row_chunks(logits.shape):
                block = grad[b, :, top:bottom]  # [C, rows, W] log-probabilities
                labels = target[b, top:bottom]
                valid = labels != ignore_index
                safe = torch.where(valid, labels, 0)[None].long()
                picked = block.gather(0, safe)[0]
                partial.append(torch.where(valid, picked, 0.0).sum())
                block.exp_()
                block.scatter_add_(0, safe, valid[None].float().neg_())
                block.mul_(valid[None] * scale)
        ctx.save_for_backward(grad)
        return torch.stack(partial).sum().neg_() * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # CPU only, so reading the incoming gradient costs no device sync. Handing the saved tensor on is safe:
        # autograd only accumulates in place into a gradient nothing else references.
        if grad_output.item() == 1.0:
            return grad, None, None, None
        return grad * grad_output, None, None, None


def unsup_loss_from_reliable(
    student_logits_u: torch.Tensor, reliable_labels: torch.Tensor, kept_count: torch.Tensor,
    valid_count: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """`(valid / kept) * CE(mean over kept)`, the published compute_unsupervised_loss's `(B*H*W / kept)` (spec
    section 4) with both counts over the same pixels: the published code has no ignored pseudo-label, so its
    B*H*W are its valid pixels; here padding is ignored and must not count, or the loss grows with it."""
    scale = valid_count.detach().float() / kept_count.detach().clamp(min=1).float() ** 2  # valid / kept^2, fp32
    if host_path(student_logits_u.device) and student_logits_u.dim() == 4:
        with torch.autocast("cpu", enabled=False):
            return _ScaledCESumCPU.apply(student_logits_u.float(), reliable_labels, ignore_index, scale)
    return _ce_sum(student_logits_u, reliable_labels, ignore_index) * scale


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
