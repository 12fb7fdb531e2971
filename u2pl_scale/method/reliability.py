"""Reliable and unreliable pixels from the teacher's entropy (U2PL_SPEC.md sections 4 and 6).

Everything here stays on the tensors' device with fixed shapes: percentiles are a sort of order-preserving
integer keys (a radix sort on both CPU and CUDA) plus a gather at a count-dependent position, so no value is
ever read back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

Number = Union[float, int, torch.Tensor]

ENTROPY_EPS = 1e-10


def entropy(prob: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """Per-pixel entropy `-sum_c p log(p + eps)` of a softmax `prob` [B, C, H, W] -> [B, H, W] (spec section 4)."""
    prob = prob.float()
    return -(prob * torch.log(prob + eps)).sum(dim=1)


def entropy_from_logits(logits: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """`entropy(softmax(logits))` in fp32 [B, C, H, W] -> [B, H, W]."""
    with torch.autocast(logits.device.type, enabled=False):
        return entropy(torch.softmax(logits.float(), dim=1), eps)


def drop_percent(progress: Number, start: float = 20.0) -> Number:
    """Percent of highest-entropy pseudo-labels dropped at training progress t = epoch/epochs (spec section 4)."""
    return start * (1.0 - progress)


def alpha_t(progress: Number, start: float = 20.0) -> Number:
    """Percentile that splits low- and high-entropy pixels for the contrastive loss (spec section 6)."""
    return start * (1.0 - progress)


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose integer order is the float order of `values` (fp32), so a radix sort can be used."""
    bits = values.float().contiguous().view(torch.int32)
    # negative floats: flip every bit but the sign, so larger magnitudes sort lower
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def percentiles(values: torch.Tensor, valid_mask: torch.Tensor, qs: Union[Sequence[Number], torch.Tensor]) -> torch.Tensor:
    """Percentiles `qs` (in [0, 100]) of `values[valid_mask]`, like numpy.percentile's default 'linear' method.

    One sort serves all `qs`. Returns a [len(qs)] fp32 tensor on the values' device. With no valid entry the
    result is +inf (so `H >= threshold` selects nothing), computed without a host sync.
    """
    flat = values.reshape(-1).float()
    valid = valid_mask.reshape(-1).to(torch.bool)
    keys = torch.where(valid, _order_keys(flat), torch.iinfo(torch.int32).max)  # invalid entries sort last
    order = torch.sort(keys, stable=True).indices
    count = valid.sum()
    q = torch.as_tensor(qs, dtype=torch.float64, device=flat.device).reshape(-1)
    position = q / 100.0 * (count - 1).clamp(min=0).to(torch.float64)
    lower = position.floor()
    fraction = (position - lower).float()
    lower_index = lower.long().clamp(0, flat.numel() - 1)
    upper_index = torch.minimum(lower_index + 1, (count - 1).clamp(min=0))
    lower_value = flat[order[lower_index]]
    upper_value = flat[order[upper_index]]
    result = lower_value + (upper_value - lower_value) * fraction
    return torch.where(count > 0, result, torch.full_like(result, float("inf")))


def percentile(values: torch.Tensor, valid_mask: torch.Tensor, q: Number) -> torch.Tensor:
    """The q-th percentile (q in [0, 100]) of `values[valid_mask]` as a 0-dim tensor; +inf if nothing is valid."""
    return percentiles(values, valid_mask, [q] if not torch.is_tensor(q) else q.reshape(1))[0]


def drop_unreliable(
    pseudo_labels: torch.Tensor, entropy_map: torch.Tensor, threshold: torch.Tensor, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set pseudo-labels of pixels with entropy >= threshold to `ignore_index` (spec section 4).

    Returns (reliable labels [B, H, W], kept pixel count as a 0-dim tensor).
    """
    valid = pseudo_labels != ignore_index
    unreliable = (entropy_map >= threshold) & valid
    reliable_labels = torch.where(unreliable, torch.full_like(pseudo_labels, ignore_index), pseudo_labels)
    return reliable_labels, (valid & ~unreliable).sum()


def entropy_masks(
    entropy_map: torch.Tensor, valid_mask: torch.Tensor, low_threshold: torch.Tensor, high_threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-entropy (H <= low) and high-entropy (H >= high) masks, both restricted to valid pixels (spec section 6)."""
    low = (entropy_map <= low_threshold) & valid_mask
    high = (entropy_map >= high_threshold) & valid_mask
    return low, high


@dataclass
class Reliability:
    """What the unlabeled half of a step needs to know about its pixels (crop resolution)."""

    entropy: torch.Tensor  # [B, H, W] fp32 teacher entropy
    reliable_labels: torch.Tensor  # [B, H, W] pseudo-labels with unreliable pixels set to ignore
    kept_count: torch.Tensor  # 0-dim: pixels left in reliable_labels
    valid_count: torch.Tensor  # 0-dim: non-ignored pseudo-labels before dropping
    drop_threshold: torch.Tensor  # 0-dim: entropy percentile (100 - drop_percent)
    low_mask: torch.Tensor  # [B, H, W] bool: H <= percentile(alpha_t), non-ignored
    high_mask: torch.Tensor  # [B, H, W] bool: H >= percentile(100 - alpha_t), non-ignored

    @property
    def reliable_ratio(self) -> torch.Tensor:
        return self.kept_count.float() / self.valid_count.clamp(min=1).float()


def reliability(
    teacher_logits_u: torch.Tensor,
    pseudo_labels: torch.Tensor,
    drop_percent: Number,
    alpha_t: Number,
    ignore_index: int = 255,
    entropy_map: torch.Tensor | None = None,
) -> Reliability:
    """Entropy, reliable pseudo-labels and the low/high entropy masks of the unlabeled batch from ONE sort.

    `teacher_logits_u` [B, C, H, W] are the teacher's logits at crop size (spec section 3 step 6), `pseudo_labels`
    [B, H, W] the (CutMixed) teacher argmax with `ignore_index` where invalid. Thresholds: drop at the
    (100 - drop_percent) percentile (section 4); low at alpha_t, high at (100 - alpha_t) (section 6); all over
    the non-ignored pixels of the whole batch.
    """
    if entropy_map is None:
        entropy_map = entropy_from_logits(teacher_logits_u)
    valid = pseudo_labels != ignore_index
    thresholds = percentiles(entropy_map, valid, _as_percent_list(100.0 - drop_percent, alpha_t, 100.0 - alpha_t))
    drop_threshold, low_threshold, high_threshold = thresholds[0], thresholds[1], thresholds[2]
    reliable_labels, kept_count = drop_unreliable(pseudo_labels, entropy_map, drop_threshold, ignore_index)
    low, high = entropy_masks(entropy_map, valid, low_threshold, high_threshold)
    return Reliability(entropy_map, reliable_labels, kept_count, valid.sum(), drop_threshold, low, high)


def _as_percent_list(*qs: Number) -> Union[list, torch.Tensor]:
    tensors = [q for q in qs if torch.is_tensor(q)]
    if tensors:
        device = tensors[0].device
        return torch.stack([torch.as_tensor(q, dtype=torch.float64, device=device).reshape(()) for q in qs])
    return [float(q) for q in qs]


def _nearest_source_index(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    # F.interpolate(mode="nearest"): src = min(floor(dst * in/out), in - 1), scale in fp32
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    index = (torch.arange(out_size, dtype=torch.float32) * scale).floor().long().clamp(max=in_size - 1)
    return index.to(device)


def downsample_nearest(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of per-pixel maps [B, H, W] (labels or masks) to `size`, as F.interpolate does.

    Equivalent to resizing the one-hot labels, which is what the published code does (spec section 6); picks the
    source rows/columns directly instead of converting the full-size maps to float.
    """
    rows = _nearest_source_index(maps.shape[1], size[0], maps.device)
    cols = _nearest_source_index(maps.shape[2], size[1], maps.device)
    return maps.index_select(1, rows).index_select(2, cols)
