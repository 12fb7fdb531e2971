"""U2PL's student/teacher on a plain ViT encoder (DINOv2, DINOv3, any timm `vit_*` / `eva*` model).

The final-normed patch tokens of four blocks (as UniMatch V2 reads them: 2/5/8/11 of 12, 4/11/17/23 of 24) are
reassembled DPT-style at strides patch/4, patch/2, patch and 2 x patch, fused from coarse to fine, and resized to
stride 4 of the input, where the classifier and the representation head of DeepLabV3Plus read them: the same
{"pred", "rep"} outputs, so the method does not know which encoder it trains. Any crop works: the input is padded
to a multiple of the patch size and the outputs are cropped back.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import create_checked
from .blocks import conv_bn_relu, head as _head

VIT_PREFIXES = ("vit_", "eva")


def is_vit(name: str) -> bool:
    return name.startswith(VIT_PREFIXES)


def default_blocks(depth: int) -> list[int]:
    """Four blocks spread over the depth, ending at the last: 2/5/8/11 of 12, 4/11/17/23 of 24 (UniMatch V2)."""
    if depth == 24:
        return [4, 11, 17, 23]
    return [round(depth * k / 4) - 1 for k in (1, 2, 3, 4)]


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, channels, 3, padding=1,
                                                                               bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class _Fusion(nn.Module):
    """DPT fusion: the coarser result, resized to this scale, plus this scale's refined map, refined again."""

    def __init__(self, channels: int):
        super().__init__()
        self.skip = _Residual(channels)
        self.out = _Residual(channels)

    def forward(self, x: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        x = self.skip(x)
        if coarser is not None:
            x = x + F.interpolate(coarser, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(x)


class ViTSegmenter(nn.Module):
    """{"pred": logits at stride 4, "rep": features at stride 4} from a timm ViT."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool = False, pretrained_path: str = "",
                 blocks: Sequence[int] = (), channels: int = 256, rep_dim: int = 256, dropout: float = 0.1,
                 drop_path: float = 0.0, freeze_backbone: bool = False, grad_checkpointing: bool = False,
                 allow_partial_load: bool = False, backbone_kwargs: dict | None = None):
        super().__init__()
        self.backbone = create_checked(backbone, pretrained, pretrained_path, allow_partial_load, num_classes=0,
                                       dynamic_img_size=True, drop_path_rate=drop_path, **(backbone_kwargs or {}))
        depth = len(self.backbone.blocks)
        self.blocks = list(blocks) or default_blocks(depth)
        if len(self.blocks) != 4 or not all(0 <= b < depth for b in self.blocks):
            raise ValueError(f"model.vit_blocks: four block indices in [0, {depth}) for {backbone!r}, "
                             f"got {self.blocks}")
        self.patch = int(self.backbone.patch_embed.patch_size[0])
        dim = int(self.backbone.embed_dim)
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.reassemble = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim, channels, 1), nn.ConvTranspose2d(channels, channels, 4, stride=4)),
            nn.Sequential(nn.Conv2d(dim, channels, 1), nn.ConvTranspose2d(channels, channels, 2, stride=2)),
            nn.Conv2d(dim, channels, 1),
            nn.Sequential(nn.Conv2d(dim, channels, 1), nn.Conv2d(channels, channels, 3, stride=2, padding=1)),
        ])
        self.fusion = nn.ModuleList([_Fusion(channels) for _ in range(4)])
        self.classifier = _head(channels, channels, num_classes, dropout)
        self.representation = _head(channels, channels, rep_dim, dropout)

    def forward(self, x: torch.Tensor) -> dict:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.patch, (-w) % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros: the mean colour of the normalised input
        tokens = self.backbone.forward_intermediates(x, indices=self.blocks, norm=True, output_fmt="NCHW",
                                                     intermediates_only=True)
        maps = [r(t) for r, t in zip(self.reassemble, tokens)]
        y = self.fusion[3](maps[3])
        for i in (2, 1, 0):
            y = self.fusion[i](maps[i], y)
        # stride 4 of the padded input, then the part that covers the real image
        padded = (math.ceil(x.shape[-2] / 4), math.ceil(x.shape[-1] / 4))
        y = F.interpolate(y, size=padded, mode="bilinear", align_corners=False)[..., :math.ceil(h / 4),
                                                                                  :math.ceil(w / 4)]
        return {"pred": self.classifier(y), "rep": self.representation(y)}
