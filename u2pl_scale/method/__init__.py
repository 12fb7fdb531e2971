"""U2PL itself (U2PL_SPEC.md sections 2-6): reliability, losses, CutMix, EMA teacher, class queues, contrastive loss.

Pure functions of tensors plus a small state object (ClassQueues); no config or engine imports. The stages that
u2pl_scale/accel implements again for a device are named in stages.py.
"""

from .contrastive import ContrastiveMasks, ContrastiveOutput, contrastive_inputs, contrastive_loss, contrastive_masks
from .cutmix import box_masks, cutmix, cutmix_flag, sample_boxes
from .ema import copy_, decay_at, follow_, update_
from .losses import ce_mean, ohem_ce, sup_loss, unsup_loss, unsup_loss_from_reliable
from .queues import ClassQueues
from .reliability import (
    Reliability,
    alpha_t,
    downsample_nearest,
    drop_percent,
    drop_unreliable,
    entropy,
    entropy_from_logits,
    entropy_masks,
    percentile,
    percentiles,
    reliability,
)

__all__ = [
    "ClassQueues",
    "ContrastiveMasks",
    "ContrastiveOutput",
    "Reliability",
    "alpha_t",
    "box_masks",
    "ce_mean",
    "contrastive_inputs",
    "contrastive_loss",
    "contrastive_masks",
    "copy_",
    "cutmix",
    "cutmix_flag",
    "decay_at",
    "downsample_nearest",
    "drop_percent",
    "drop_unreliable",
    "entropy",
    "entropy_from_logits",
    "entropy_masks",
    "follow_",
    "ohem_ce",
    "percentile",
    "percentiles",
    "reliability",
    "sample_boxes",
    "sup_loss",
    "unsup_loss",
    "unsup_loss_from_reliable",
    "update_",
]
