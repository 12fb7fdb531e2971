"""The method's replaceable stages: the passes that some devices run faster another way (u2pl_scale/accel).

Each field is one implementation of a stage, with the reference implementation's signature and results; the
reference is the function beside the stage's maths in this package. The trainer picks a `Stages` once, from its
device and config (`u2pl_scale.accel.select`), and hands it to the method's functions (their `stages` argument)
and to ClassQueues (`write`); None there means the reference.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .contrastive import anchor_negatives, gather_pixels, prototype_rows
from .masks import negative_mask
from .losses import scaled_ce_sum
from .queues import write_compacted
from .reliability import entropy_from_logits, percentiles_and_count


@dataclass(frozen=True)
class Stages:
    name: str
    entropy_from_logits: Callable = entropy_from_logits  # teacher entropy at crop size (spec 4)
    percentiles_and_count: Callable = percentiles_and_count  # entropy thresholds (spec 4, 6)
    scaled_ce_sum: Callable = scaled_ce_sum  # the unsupervised CE (spec 4)
    negative_mask: Callable = negative_mask  # each class's negative candidates (spec 6)
    prototype_rows: Callable = prototype_rows  # unit rows for the queues, prototype sums (spec 6)
    gather_pixels: Callable = gather_pixels  # the sampled anchors' student features (spec 6)
    anchor_negatives: Callable = anchor_negatives  # the anchors' logits against their negatives (spec 6)
    queue_write: Callable = write_compacted  # the queue push (spec 6)

    def replace(self, name: str, **stages: Callable) -> "Stages":
        """These stages with some replaced, under a new name."""
        return dataclasses.replace(self, name=name, **stages)


REFERENCE = Stages("reference")
