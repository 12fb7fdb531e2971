"""CutMix of the unlabeled batch with its pseudo-labels and confidence (U2PL_SPEC.md section 3 step 3).

For image i a box of half the image area is filled with the content of image (i + 1) mod B, and the same box is
applied to every per-pixel tensor (pseudo-labels, confidence, ignore masks...). Box sampling follows the
published generate_cutout_mask: width uniform integer in [floor(W/2) + 1, W - 1] (np.random.randint(W/2 + 1, W)),
height = round(H*W/2 / width), top-left corner uniform so the box fits. Everything is on device; whether the
batch is mixed at all is a 0-dim bool tensor applied with torch.where (no Python branch on tensor values).
"""

from __future__ import annotations

from typing import Optional, Union

import torch


def cutmix_flag(
    probability: float = 0.5, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """0-dim bool tensor: apply CutMix to this batch, with `probability` (spec: 0.5 for the whole batch)."""
    return torch.rand((), generator=generator, device=device) < probability


def sample_boxes(
    batch: int,
    height: int,
    width: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """One box per image as a [batch, 4] long tensor of (y0, x0, h, w)."""
    area = height * width / 2.0
    low_width = width // 2 + 1  # published: np.random.randint(W/2 + 1, W), i.e. W/2 < w < W
    uniform = torch.rand(batch, 3, generator=generator, device=device, dtype=torch.float64)
    box_w = (low_width + (uniform[:, 0] * (width - low_width)).floor()).clamp(max=width - 1)
    box_h = torch.round(area / box_w).clamp(max=height)
    y0 = (uniform[:, 1] * (height - box_h + 1)).floor().clamp(max=height - box_h)
    x0 = (uniform[:, 2] * (width - box_w + 1)).floor().clamp(max=width - box_w)
    return torch.stack([y0, x0, box_h, box_w], dim=1).long()


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H, W] bool masks, True inside each image's box (y0 <= y < y0 + h, x0 <= x < x0 + w)."""
    y0, x0, box_h, box_w = (boxes[:, k, None, None] for k in range(4))
    rows = torch.arange(height, device=boxes.device)[None, :, None]
    cols = torch.arange(width, device=boxes.device)[None, None, :]
    return (rows >= y0) & (rows < y0 + box_h) & (cols >= x0) & (cols < x0 + box_w)


def mix_with_next(tensor: torch.Tensor, inside_box: torch.Tensor) -> torch.Tensor:
    """Inside image i's box take image (i + 1) mod B; `tensor` is [B, ...] with per-pixel trailing H, W dims."""
    shifted = torch.roll(tensor, shifts=-1, dims=0)  # shifted[i] = tensor[(i + 1) % B]
    mask = inside_box
    while mask.dim() < tensor.dim():  # [B, H, W] -> [B, 1, H, W] for images
        mask = mask[:, None]
    return torch.where(mask, shifted, tensor)


def cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    conf: torch.Tensor,
    *extra: torch.Tensor,
    apply: Union[bool, torch.Tensor] = True,
    boxes: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, ...]:
    """CutMix images [B, 3, H, W], pseudo-labels [B, H, W], confidence [B, H, W] and any `extra` [B, (.,) H, W].

    `apply` (bool or 0-dim bool tensor) switches the whole batch; when False every tensor is returned unchanged.
    `boxes` ([B, 4] from sample_boxes) may be given; otherwise they are drawn with `generator`.
    Returns (images, labels, conf, *extra).
    """
    if not torch.is_tensor(apply) and not apply:
        return (images, labels, conf, *extra)
    batch, _, height, width = images.shape
    if boxes is None:
        boxes = sample_boxes(batch, height, width, generator=generator, device=images.device)
    inside = box_masks(boxes, height, width)
    if torch.is_tensor(apply):  # a device-side decision: no host read
        inside = inside & apply.to(device=images.device, dtype=torch.bool)
    return tuple(mix_with_next(t, inside) for t in (images, labels, conf, *extra))
