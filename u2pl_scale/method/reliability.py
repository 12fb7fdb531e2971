"""Reliable and unreliable pixels from the teacher's entropy (U2PL_SPEC.md sections 4 and 6).

Everything here stays on the tensors' device with fixed shapes: percentiles are one sort (on CPU a radix select
over order-preserving integer keys) plus a gather at a count-dependent position, so no value is ever read back to
the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from . import native
from .fp32 import fp32_region
from .kernels import select_percentiles
from .paths import cpu_single_thread, host_path  # noqa: F401  (cpu_single_thread: re-exported)

Number = Union[float, int, torch.Tensor]

ENTROPY_EPS = 1e-10


def entropy(prob: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """Per-pixel entropy `-sum_c p log(p + eps)` of a softmax `prob` [B, C, H, W] -> [B, H, W] (spec section 4)."""
    prob = prob.float()
    terms = prob + eps  # one temporary, updated in place: same values as -(prob * log(prob + eps)).sum(1)
    terms.log_()
    terms.mul_(prob)
    return terms.sum(dim=1).neg_()


# CPU: elements per chunk of the fused softmax/entropy/CE passes, so a chunk's temporaries stay in cache
CPU_CHUNK_ELEMENTS = 1 << 19


def cpu_row_chunks(shape: torch.Size) -> list[tuple[int, int, int]]:
    """(image, first row, end row) blocks of a [B, C, H, W] map with about CPU_CHUNK_ELEMENTS elements each."""
    batch, channels, height, width = shape
    rows = max(1, min(height, CPU_CHUNK_ELEMENTS // max(1, channels * width)))
    return [(b, r, min(height, r + rows)) for b in range(batch) for r in range(0, height, rows)]


def entropy_from_logits(logits: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """`entropy(softmax(logits))` in fp32 [B, C, H, W] -> [B, H, W].

    On CPU, in cache-sized row blocks of each image, as log(S) - sum_c e_c d_c / S with d = z - max_c z,
    e = exp(d), S = sum_c e: one exp per element and one log per pixel, where softmax then log(p + eps) takes an
    exp and a log per element (measured 17 -> 14 ms at VOC shapes). The two differ by at most C * eps per pixel
    (the eps term), below fp32 rounding of the entropy, and d <= 0 keeps small entropies accurate.
    Elsewhere: softmax, then -sum_c p log p (torch.special.entr), which differs from the published formula by the same
    eps term.
    """
    with fp32_region(logits.device):
        if not host_path(logits.device) or logits.dim() != 4:
            # -sum_c p log p (special.entr, 0 at p = 0): three kernels where the published formula takes six; it
            # differs from -sum_c p log(p + eps) by less than C * eps per pixel, as the CPU form below
            return torch.special.entr(torch.softmax(logits.float(), dim=1)).sum(1)
        logits = logits.float()
        fused = native.entropy(logits)  # one pass in C where the kernels are built (same form, native.py)
        if fused is not None:
            return fused
        batch, classes, height, width = logits.shape
        out = torch.empty(batch, height, width, dtype=torch.float32)
        chunks = cpu_row_chunks(logits.shape)
        size = classes * (chunks[0][2] - chunks[0][1]) * width
        shifted_buf, exp_buf = torch.empty(size, dtype=torch.float32), torch.empty(size, dtype=torch.float32)
        with cpu_single_thread(logits.device):
            for b, top, bottom in chunks:
                block = logits[b, :, top:bottom]
                shifted = torch.sub(block, block.amax(0), out=shifted_buf[: block.numel()].view(block.shape))
                exps = torch.exp(shifted, out=exp_buf[: block.numel()].view(block.shape))
                total = exps.sum(0)
                weighted = shifted.mul_(exps).sum(0)
                torch.sub(total.log(), weighted.div_(total), out=out[b, top:bottom])
        return out


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


def _from_order_keys(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of `_order_keys` (the bit flip is its own inverse)."""
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _select_keys_cpu(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`torch.sort(keys).values[positions]` for int32 keys on CPU by a one-level radix select: a histogram of the
    top 16 bits finds the bucket of each wanted position, and only those buckets are sorted (host-side sizes)."""
    bucket = (keys >> 16) + 32768  # 0 .. 65535, in key order
    counts = torch.bincount(bucket, minlength=1 << 16)
    ends = torch.cumsum(counts, 0)
    wanted = torch.searchsorted(ends, positions, right=True)  # bucket holding each position
    starts = (ends - counts)[wanted]
    out = torch.empty(positions.shape, dtype=keys.dtype)
    for b in torch.unique(wanted).tolist():
        in_bucket = torch.sort(keys[bucket == b]).values
        take = wanted == b
        out[take] = in_bucket[positions[take] - starts[take]]
    return out


def percentiles(values: torch.Tensor, valid_mask: torch.Tensor, qs: Union[Sequence[Number], torch.Tensor]) -> torch.Tensor:
    """Percentiles `qs` (in [0, 100]) of `values[valid_mask]`, like numpy.percentile's default 'linear' method.

    One sort serves all `qs`. Returns a [len(qs)] fp32 tensor on the values' device. With no valid entry the
    result is +inf (so `H >= threshold` selects nothing), computed without a host sync.
    """
    return _percentiles_and_count(values, valid_mask, qs)[0]


def _percentiles_and_count(values: torch.Tensor, valid_mask: torch.Tensor,
                           qs: Union[Sequence[Number], torch.Tensor],
                           masked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`percentiles`, and the number of valid entries (0-dim long) it counted on the way. `masked`, if given, is
    `values` with NaN at the invalid entries (reliability has it anyway): the device path sorts it as it is, NaN
    last (as torch.sort orders a positive NaN on every device), where it would otherwise mask with +inf."""
    flat = values.reshape(-1).float()
    valid = valid_mask.reshape(-1).to(torch.bool)
    count = valid.sum()
    if host_path(flat.device):
        # no device to keep in sync with: select the few order statistics instead of sorting everything, by a
        # radix select over integer keys (a bijection of the fp32 bit patterns that keeps their order)
        keys = torch.where(valid, _order_keys(flat), torch.iinfo(torch.int32).max)  # invalid entries sort last
        return _interpolated(lambda bounds: _from_order_keys(_select_keys_cpu(keys, bounds)), count, qs), count
    # one sort of the values (a radix sort on CUDA), invalid entries last
    ordered = masked.reshape(-1) if masked is not None else torch.where(valid, flat, float("inf"))
    sorted_values = torch.sort(ordered).values
    if not torch.is_tensor(qs):  # CUDA with Triton: then one kernel (kernels.launch_triton_percentiles)
        selected = select_percentiles(sorted_values, count, _fractions(qs))
        if selected is not None:
            return selected, count
    return _interpolated(lambda bounds: sorted_values[bounds], count, qs), count


def _fractions(qs: Sequence[Number]) -> list[float]:
    """Percentiles given as Python numbers as fractions in [0, 1] (q outside [0, 100] clamps to the ends)."""
    return [min(max(float(q), 0.0), 100.0) / 100.0 for q in qs]


def _interpolated(take, count: torch.Tensor, qs: Union[Sequence[Number], torch.Tensor]) -> torch.Tensor:
    """The percentiles `qs` of `count` sorted values, given `take(bounds)`: the sorted values at positions bounds."""
    last = (count - 1).clamp_(min=0).to(torch.float64)
    if torch.is_tensor(qs):
        position = qs.to(device=count.device, dtype=torch.float64).reshape(-1).clamp(0.0, 100.0) / 100.0 * last
    else:  # python numbers: scalar arithmetic on the device tensor, no host-to-device copy
        position = torch.stack([last * f for f in _fractions(qs)])
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
    masked = _nan_where_invalid(entropy_map, valid)  # also the percentiles' sort input (NaN sorts last)
    thresholds, valid_count = _percentiles_and_count(
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


@functools.lru_cache(maxsize=64)
def _nearest_source_index(in_size: tuple[int, int], out_size: tuple[int, int],
                          device: torch.device) -> torch.Tensor:
    """Flat source pixel (row * in_width + col) of every output pixel, [out_h * out_w], as F.interpolate(mode=
    "nearest") picks it: src = min(floor(dst * in/out), in - 1) per axis, scale in fp32. Built on the device (no
    host-to-device copy in the step) once per size; callers only read it."""
    with torch.inference_mode(False):  # a cached tensor must stay usable outside inference mode
        axes = []
        for n_in, n_out in zip(in_size, out_size):
            scale = torch.full((), n_in / n_out, dtype=torch.float32, device=device)
            axes.append((torch.arange(n_out, dtype=torch.float32, device=device) * scale).floor().long()
                        .clamp(max=n_in - 1))
        return (axes[0][:, None] * in_size[1] + axes[1][None, :]).reshape(-1)


def downsample_nearest(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of per-pixel maps [B, H, W] (labels or masks) to `size`, as F.interpolate does.

    Equivalent to resizing the one-hot labels, which is what the published code does (spec section 6); picks the
    source pixels directly (one gather) instead of converting the full-size maps to float.
    """
    source = _nearest_source_index(tuple(maps.shape[1:]), tuple(size), maps.device)
    return maps.reshape(maps.shape[0], -1).index_select(1, source).view(maps.shape[0], *size)
