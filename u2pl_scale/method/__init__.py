"""U2PL itself (U2PL_SPEC.md sections 2-6): reliability, losses, CutMix, EMA teacher, class queues, contrastive loss.

Pure functions of tensors plus small state objects (ClassQueues, EMATeacher); no config or engine imports.
"""

from .contrastive import ContrastiveMasks, ContrastiveOutput, contrastive_inputs, contrastive_loss, contrastive_masks
from .cutmix import box_masks, cutmix, cutmix_flag, sample_boxes
from .ema import EMATeacher, copy_, decay_at, update_
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
    "EMATeacher",
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
