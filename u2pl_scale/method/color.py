"""Optional colour strong augmentation of the student's unlabeled batch: a random hue rotation per image.

The spec (U2PL_SPEC.md section 3 step 3) lists colour jitter among the strong augmentations that are off in the
published defaults; `method.hue_jitter > 0` turns this one on. Each unlabeled image i gets an angle
theta_i uniform in [-hue_jitter, hue_jitter] x 360 degrees, and its RGB pixels are rotated by theta_i around
the grey axis (1, 1, 1) / sqrt(3) (the classic linear "hue-rotate" filter: brightness r + g + b is kept),
then clipped to 0..255. The teacher's pseudo-labels come from the unrotated images (step 2), so the student has
to predict them from what is left: shape and texture instead of colour.

It runs on the normalised batch as one affine map per image, x' = A_i x + b_i with A_i = D^-1 R_i D and
b_i = D^-1 (R_i - I) mean (D = diag(std)), then a per-channel clip: a batched matmul, no host sync.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..data.transforms import channel_stats  # cached on the device: no host copy per step


def hue_rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """[B] angles in radians -> [B, 3, 3] rotations about the grey axis (Rodrigues' formula)."""
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    axis = torch.full((3,), 1.0 / math.sqrt(3.0), dtype=angles.dtype, device=angles.device)
    outer = axis[:, None] * axis[None, :]
    cross = torch.zeros(3, 3, dtype=angles.dtype, device=angles.device)  # [axis]_x
    cross[0, 1], cross[0, 2], cross[1, 2] = -axis[2], axis[1], -axis[0]
    cross = cross - cross.t()
    eye = torch.eye(3, dtype=angles.dtype, device=angles.device)
    return cos * eye + (1.0 - cos) * outer + sin * cross


def rotate_hue(images: torch.Tensor, angles: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images [B, 3, H, W] ((pixel - mean) / std, pixels 0..255) with image i's hue rotated by
    angles[i] radians, pixels clipped to 0..255; memory format kept."""
    device, dtype = images.device, torch.float32
    mean_t, std_t = (t.reshape(3) for t in channel_stats(tuple(map(float, mean)), tuple(map(float, std)), device))
    rotation = hue_rotation_matrices(angles.to(dtype))
    matrix = rotation * (std_t[None, None, :] / std_t[None, :, None])  # D^-1 R D
    offset = ((rotation - torch.eye(3, dtype=dtype, device=device)) @ mean_t) / std_t  # D^-1 (R - I) mean
    out = torch.einsum("bij,bjhw->bihw", matrix, images.float()) + offset[:, :, None, None]
    low, high = (-mean_t / std_t)[None, :, None, None], ((255.0 - mean_t) / std_t)[None, :, None, None]
    out = torch.maximum(torch.minimum(out, high), low)
    if images.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(images.dtype)


def random_hue(images: torch.Tensor, max_fraction: float, mean: Sequence[float], std: Sequence[float],
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """rotate_hue with angles uniform in [-max_fraction, max_fraction] of a full turn, drawn on the device."""
    uniform = torch.rand(images.shape[0], generator=generator, device=images.device)
    return rotate_hue(images, (2.0 * uniform - 1.0) * (max_fraction * 2.0 * math.pi), mean, std)
