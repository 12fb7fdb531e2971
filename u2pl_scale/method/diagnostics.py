"""What the method did in a step, for the logs: a contrastive loss that does nothing, negatives that come from
one source only, or queues overwritten every step must be visible while a run trains (U2PL_SPEC.md sections 4, 6).

Computed on log steps only, without gradients, from the same tensors as the step (the same masks: the functions
are deterministic), so the step itself is unchanged. `step_diagnostics` reads nothing back to the host;
`summarize` does, once, on the log step.
"""
from __future__ import annotations

from typing import Optional

import torch

from .masks import contrastive_inputs, contrastive_masks
from .reliability import alpha_t, downsample_nearest, drop_percent, reliability


@torch.no_grad()
def step_diagnostics(pred: torch.Tensor, y_l: torch.Tensor, pseudo_u: torch.Tensor, prob_t: torch.Tensor,
                     logits_u_t: torch.Tensor, progress: float, *, ignore_index: int, drop_percent_start: float,
                     low_entropy_start: float, anchor_threshold: float, negative_threshold: float, low_rank: int,
                     high_rank: int) -> dict:
    """Device tensors of one rank's step: per-class counts [C] (`present`, `anchors`, `negatives`), negative
    candidates from labeled and from unlabeled pixels, and the student/teacher argmax agreement on the valid
    unlabeled pixels at feature resolution (`agree`, `agree_total`). Sums over ranks are meaningful for all."""
    b_l = y_l.shape[0]
    size = pred.shape[-2:]
    rel = reliability(logits_u_t, pseudo_u, drop_percent(progress, drop_percent_start),
                      alpha_t(progress, low_entropy_start), ignore_index=ignore_index)
    labels, low, high = contrastive_inputs(y_l, pseudo_u, rel.low_mask, rel.high_mask, size, ignore_index)
    masks = contrastive_masks(prob_t, labels, low, high, b_l, anchor_threshold, negative_threshold, low_rank,
                              high_rank)
    negative = masks.negative  # [N, C, hw]
    valid_u = downsample_nearest(pseudo_u != ignore_index, size)
    agree = (pred[b_l:].argmax(1) == prob_t[b_l:].argmax(1)) & valid_u
    return {"present": masks.label_low.any(2).sum(0), "anchors": masks.anchor.sum((0, 2)),
            "negatives": negative.sum((0, 2)), "negatives_labeled": negative[:b_l].sum(),
            "negatives_unlabeled": negative[b_l:].sum(), "agree": agree.sum(), "agree_total": valid_u.sum()}


def summarize(diag: dict, capacities: torch.Tensor, fill: torch.Tensor, world_size: int) -> dict:
    """Log values from `step_diagnostics` summed over ranks and the shared queues' state. `queue_pushed`: rows
    each class's queue took this step (all ranks' negatives, at most its capacity); a queue whose pushed rows reach
    its capacity is overwritten whole every step (`queues_overwritten`)."""
    host = {k: v.detach().cpu() for k, v in diag.items()}  # a log step: the one host read
    capacities = capacities.cpu()
    pushed = torch.minimum(host["negatives"], capacities)
    fill_frac = fill.cpu() / capacities
    return {
        "classes_present": float(host["present"].gt(0).sum()),
        "classes_with_anchors": float(host["anchors"].gt(0).sum()),
        "anchor_candidates_per_rank": host["anchors"].float().div(world_size).tolist(),
        "negatives_from_labeled": float(host["negatives_labeled"]),
        "negatives_from_unlabeled": float(host["negatives_unlabeled"]),
        "queue_pushed": pushed.tolist(),
        "queue_fill": [round(v, 4) for v in fill_frac.tolist()],
        "queue_fill_mean": float(fill_frac.mean()),
        "queues_overwritten": float((pushed >= capacities).sum()),
        "agreement": float(host["agree"]) / max(1.0, float(host["agree_total"])),
    }


def few_class_warning(num_classes: int, low_rank: int) -> Optional[str]:
    """What the contrastive loss cannot do with few classes, or None. (With fewer classes than high_rank the rank
    window is simply cut at the last class: nothing is lost.)"""
    if num_classes > low_rank:
        return None
    return (f"{num_classes} classes <= method.contrastive.low_rank={low_rank}: no class is ever ranked "
            f"{low_rank + 1}th or lower, so unlabeled pixels are never negatives. Negatives come only from labeled "
            f"pixels (a wrong class among the teacher's top {low_rank}), and the unreliable pseudo-labels that U2PL "
            f"is about are not used. Set method.contrastive.low_rank below {num_classes} (e.g. 1) to use them.")
