"""Reliable and unreliable pixels from the teacher's entropy (U2PL_SPEC.md sections 4 and 6).

Everything here stays on the tensors' device with fixed shapes: percentiles are one sort plus a gather at a
count-dependent position, so no value is ever read back to the host. `entropy_from_logits` and
`percentiles_and_count` are stages that u2pl_scale/accel may replace (method/stages.py): `reliability` takes them
from its `stages` argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .fp32 import fp32_region

Number = Union[float, int, torch.Tensor]

ENTROPY_EPS = 1e-10


def entropy(prob: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """Per-pixel entropy `-sum_c p log(p + eps)` of a softmax `prob` [B, C, H, W] -> [B, H, W] (spec section 4)."""
    prob = prob.float()
    terms = prob + eps  # one temporary, updated in place: same values as -(prob * log(prob + eps)).sum(1)
    terms.log_()
    terms.mul_(prob)
    return terms.sum(dim=1).neg_()


def entropy_from_logits(logits: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """`entropy(softmax(logits))` in fp32 [B, C, H, W] -> [B, H, W] as -sum_c p log p (torch.special.entr, 0 at
    p = 0): three kernels where the published formula takes six. It differs from -sum_c p log(p + eps) by less than
    C * eps per pixel, below fp32 rounding of the entropy. (`eps` is accepted for the published signature.)"""
    with fp32_region(logits.device):
        return torch.special.entr(torch.softmax(logits.float(), dim=1)).sum(1)


def drop_percent(progress: Number, start: float = 20.0) -> Number:
    """Percent of highest-entropy pseudo-labels dropped at training progress t = epoch/epochs (spec section 4)."""
    return start * (1.0 - progress)


def alpha_t(progress: Number, start: float = 20.0) -> Number:
    """Percentile that splits low- and high-entropy pixels for the contrastive loss (spec section 6)."""
    return start * (1.0 - progress)


def percentiles(values: torch.Tensor, valid_mask: torch.Tensor,
                qs: Union[Sequence[Number], torch.Tensor]) -> torch.Tensor:
    """Percentiles `qs` (in [0, 100]) of `values[valid_mask]`, like numpy.percentile's default 'linear' method.

    One sort serves all `qs`. Returns a [len(qs)] fp32 tensor on the values' device. With no valid entry the
    result is +inf (so `H >= threshold` selects nothing), computed without a host sync.
    """
    return percentiles_and_count(values, valid_mask, qs)[0]


def percentiles_and_count(values: torch.Tensor, valid_mask: torch.Tensor,
                          qs: Union[Sequence[Number], torch.Tensor],
                          masked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`percentiles`, and the number of valid entries (0-dim long) it counted on the way. `masked`, if given, is
    `values` with NaN at the invalid entries (reliability has it anyway): it is sorted as it is, NaN last (as
    torch.sort orders a positive NaN on every device), where the values would otherwise be masked with +inf."""
    sorted_values, count = sorted_valid(values, valid_mask, masked)
    return interpolated(lambda bounds: sorted_values[bounds], count, qs), count


def sorted_valid(values: torch.Tensor, valid_mask: torch.Tensor,
                 masked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All values sorted by one sort (a radix sort on CUDA), the invalid entries last, and the number of valid
    entries (0-dim long); `masked` as in percentiles_and_count."""
    valid = valid_mask.reshape(-1).to(torch.bool)
    ordered = masked.reshape(-1) if masked is not None else torch.where(valid, values.reshape(-1).float(),
                                                                         float("inf"))
    return torch.sort(ordered).values, valid.sum()


def fractions(qs: Sequence[Number]) -> list[float]:
    """Percentiles given as Python numbers as fractions in [0, 1] (q outside [0, 100] clamps to the ends)."""
    return [min(max(float(q), 0.0), 100.0) / 100.0 for q in qs]


def interpolated(take, count: torch.Tensor, qs: Union[Sequence[Number], torch.Tensor]) -> torch.Tensor:
    """The percentiles `qs` of `count` sorted values, given `take(bounds)`: the sorted values at positions bounds."""
    last = (count - 1).clamp_(min=0).to(torch.float64)
    if torch.is_tensor(qs):
        position = qs.to(device=count.device, dtype=torch.float64).reshape(-1).clamp(0.0, 100.0) / 100.0 * last
    else:  # python numbers: scalar arithmetic on the device tensor, no host-to-device copy
        position = torch.stack([last * f for f in fractions(qs)])
    # 0 <= position <= last (q outside [0, 100] clamps to the ends), so floor and ceil are valid positions
    fraction = torch.frac(position).float()
    lower_value, upper_value = take(torch.cat([position, position.ceil()]).long()).chunk(2)  # .long() floors here
    result = torch.lerp(lower_value, upper_value, fraction)  # lower + (upper - lower) * fraction
    # with no valid entry: +inf (the values there are +inf or NaN, and lerp of +inf gives NaN)
    return torch.nan_to_num(result, nan=float("inf"))


def percentile(values: torch.Tensor, valid_mask: torch.Tensor, q: Number) -> torch.Tensor:
    """The q-th percentile (q in [0, 100]) of `values[valid_mask]` as a 0-dim tensor; +inf if nothing is valid."""
    return percentiles(values, valid_mask, [q] if not torch.is_tensor(q) else q.reshape(1))[0]


def drop_unreliable(
    pseudo_labels: torch.Tensor,
    entropy_map: torch.Tensor,
    threshold: torch.Tensor,
    ignore_index: int = 255,
    valid: torch.Tensor | None = None,
    valid_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set pseudo-labels of pixels with entropy >= threshold to `ignore_index` (spec section 4).

    Returns (reliable labels [B, H, W], kept pixel count as a 0-dim tensor). `valid` (pseudo_labels !=
    ignore_index) and its count are computed here unless the caller has them.
    """
    if valid is None:
        valid = pseudo_labels != ignore_index
    if valid_count is None:
        valid_count = valid.sum()
    return _drop_masked(pseudo_labels, _nan_where_invalid(entropy_map, valid), threshold, ignore_index, valid_count)


def entropy_masks(
    entropy_map: torch.Tensor, valid_mask: torch.Tensor, low_threshold: torch.Tensor, high_threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-entropy (H <= low) and high-entropy (H >= high) masks, both restricted to valid pixels (spec section 6)."""
    return _split_masked(_nan_where_invalid(entropy_map, valid_mask), low_threshold, high_threshold)


def _nan_where_invalid(entropy_map: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The entropies (fp32) with NaN at the invalid pixels: every comparison with a threshold is False there, so
    the masks below need no `& valid`."""
    return torch.where(valid, entropy_map.float(), float("nan"))


def _drop_masked(pseudo_labels: torch.Tensor, masked: torch.Tensor, threshold: torch.Tensor, ignore_index: int,
                 valid_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drop_unreliable from the entropies with NaN at the invalid pixels (_nan_where_invalid)."""
    unreliable = masked >= threshold
    return torch.where(unreliable, ignore_index, pseudo_labels), valid_count - unreliable.sum()


def _split_masked(masked: torch.Tensor, low_threshold: torch.Tensor,
                  high_threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """entropy_masks from the entropies with NaN at the invalid pixels (_nan_where_invalid)."""
    return masked <= low_threshold, masked >= high_threshold


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
        return self.kept_count / self.valid_count.clamp(min=1)  # true division: fp32


def reliability(
    teacher_logits_u: torch.Tensor,
    pseudo_labels: torch.Tensor,
    drop_percent: Number,
    alpha_t: Number,
    ignore_index: int = 255,
    entropy_map: torch.Tensor | None = None,
    stages: "Stages | None" = None,  # noqa: F821  (method/stages.py; None: the reference stages of this module)
) -> Reliability:
    """Entropy, reliable pseudo-labels and the low/high entropy masks of the unlabeled batch from ONE sort.

    `teacher_logits_u` [B, C, H, W] are the teacher's logits at crop size (spec section 3 step 6), `pseudo_labels`
    [B, H, W] the (CutMixed) teacher argmax with `ignore_index` where invalid. Thresholds: drop at the
    (100 - drop_percent) percentile (section 4); low at alpha_t, high at (100 - alpha_t) (section 6); all over
    the non-ignored pixels of the whole batch.
    """
    entropy_of = stages.entropy_from_logits if stages is not None else entropy_from_logits
    select = stages.percentiles_and_count if stages is not None else percentiles_and_count
    if entropy_map is None:
        entropy_map = entropy_of(teacher_logits_u)
    valid = pseudo_labels != ignore_index
    masked = _nan_where_invalid(entropy_map, valid)  # also the percentiles' sort input (NaN sorts last)
    thresholds, valid_count = select(
        entropy_map, valid, _as_percent_list(100.0 - drop_percent, alpha_t, 100.0 - alpha_t), masked=masked)
    drop_threshold, low_threshold, high_threshold = thresholds[0], thresholds[1], thresholds[2]
    reliable_labels, kept_count = _drop_masked(pseudo_labels, masked, drop_threshold, ignore_index, valid_count)
    low, high = _split_masked(masked, low_threshold, high_threshold)
    return Reliability(entropy_map, reliable_labels, kept_count, valid_count, drop_threshold, low, high)


def _as_percent_list(*qs: Number) -> Union[list, torch.Tensor]:
    tensors = [q for q in qs if torch.is_tensor(q)]
    if tensors:
        device = tensors[0].device
        return torch.stack([q.to(device=device, dtype=torch.float64).reshape(()) if torch.is_tensor(q)
                            else torch.full((), float(q), dtype=torch.float64, device=device) for q in qs])
    return [float(q) for q in qs]


def nearest_source_index(in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Flat source pixel (row * in_width + col) of every output pixel, [out_h * out_w], as F.interpolate(mode=
    "nearest") picks it: src = min(floor(dst * in/out), in - 1) per axis, in fp32 (a Python float times an fp32
    tensor is computed in fp32; truncation is floor for these non-negative values). Built on the device (no
    host-to-device copy in the step)."""
    rows, cols = (torch.arange(n_out, dtype=torch.float32, device=device).mul_(n_in / n_out).long().clamp_(max=n_in - 1)
                  for n_in, n_out in zip(in_size, out_size))
    return (rows[:, None] * in_size[1] + cols).reshape(-1)


def downsample_nearest(maps: torch.Tensor, size: tuple[int, int], source: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-neighbour resize of per-pixel maps [B, H, W] (labels or masks) to `size`, as F.interpolate does.

    Equivalent to resizing the one-hot labels, which is what the published code does (spec section 6); picks the
    source pixels directly (one gather) instead of converting the full-size maps to float.
    """
    if source is None:
        source = nearest_source_index(tuple(maps.shape[1:]), tuple(size), maps.device)
    return maps.reshape(maps.shape[0], -1).index_select(1, source).view(maps.shape[0], *size)
