"""Weak augmentation (U2PL_SPEC.md §7) on the host and normalisation on the device.

`weak_augment` runs inside DataLoader workers on uint8 NumPy arrays: random rescale (image bilinear, mask
nearest), pad to the crop at the bottom/right with the mean colour (image), ignore_index (mask) and valid=False,
random crop, horizontal flip. It draws from a NumPy Generator passed in, so a seed fixes the result.
Images stay uint8 until `normalize` runs on the device: 4x less host memory and transfer than float.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image


class AugmentedSample(NamedTuple):
    image: np.ndarray  # uint8 [crop, crop, 3]
    mask: Optional[np.ndarray]  # uint8 [crop, crop]; ignore_index in padding; None for unlabeled samples
    valid: np.ndarray  # bool [crop, crop]; False where padding


def fill_colour(mean: Sequence[float]) -> np.ndarray:
    """The padding colour: the dataset mean on 0..255 pixels, so padding normalises to about zero."""
    return np.clip(np.rint(np.asarray(mean, dtype=np.float64)), 0, 255).astype(np.uint8)


def random_scale(rng: np.random.Generator, scale_range: Sequence[float], rule: str = "published") -> float:
    """The resize factor. "published" (the published RandResize): with probability 0.5 uniform in [low, 1), else
    uniform in [1, high), so shrinking and enlarging are equally likely whatever the range's lengths; a range
    that does not straddle 1 is drawn uniformly. "uniform": uniform in [low, high)."""
    low, high = float(scale_range[0]), float(scale_range[1])
    if rule == "published" and low < 1.0 < high:
        return rng.uniform(low, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, high)
    return rng.uniform(low, high)


def weak_augment(image: np.ndarray, mask: Optional[np.ndarray], rng: np.random.Generator, crop_size: int,
                 scale_range: Sequence[float] = (0.5, 2.0), flip_prob: float = 0.5,
                 mean: Sequence[float] = (123.675, 116.28, 103.53), ignore_index: int = 255,
                 scale_rule: str = "published") -> AugmentedSample:
    """Rescale by a random factor (random_scale), pad to crop_size, random crop, random horizontal flip.

    image: uint8 [H, W, 3]; mask: uint8 [H, W] or None. Padding goes to the bottom and right (as the published
    code); the crop window is drawn over the padded extent, so only the visible part is ever copied. Padded label
    pixels are ignore_index, the paper's intent (the published code pads labels with class 0, which trains
    padding as background): they count in no loss and no metric.
    """
    height, width = image.shape[:2]
    scale = random_scale(rng, scale_range, scale_rule)
    new_h, new_w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.NEAREST))

    top = int(rng.integers(0, max(new_h - crop_size, 0) + 1))
    left = int(rng.integers(0, max(new_w - crop_size, 0) + 1))
    flip = bool(rng.random() < flip_prob)
    visible_h, visible_w = min(crop_size, new_h - top), min(crop_size, new_w - left)

    out_image = np.empty((crop_size, crop_size, 3), dtype=np.uint8)
    out_image[...] = fill_colour(mean)
    out_image[:visible_h, :visible_w] = image[top:top + visible_h, left:left + visible_w]
    valid = np.zeros((crop_size, crop_size), dtype=bool)
    valid[:visible_h, :visible_w] = True
    out_mask = None
    if mask is not None:
        out_mask = np.full((crop_size, crop_size), ignore_index, dtype=np.uint8)
        out_mask[:visible_h, :visible_w] = mask[top:top + visible_h, left:left + visible_w]

    if flip:  # contiguous copies so torch.from_numpy can take them
        out_image, valid = np.ascontiguousarray(out_image[:, ::-1]), np.ascontiguousarray(valid[:, ::-1])
        out_mask = np.ascontiguousarray(out_mask[:, ::-1]) if out_mask is not None else None
    return AugmentedSample(out_image, out_mask, valid)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channels_last: bool = False) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (on any device) -> float32 (x - mean) / std, mean/std given on 0..255 pixels."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)  # convert while still 1 byte per value
    out = images.to(torch.float32)  # keeps the memory format
    mean_t, std_t = channel_stats(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    return out.sub_(mean_t).div_(std_t)


@functools.lru_cache(maxsize=16)
def channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, C, 1, 1] mean and std on `device`, copied there once (a host-to-device copy per step would be a
    host sync on GPU)."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device),
                torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device))
