"""DeepLabv3+ with the U2PL representation head on any timm backbone (U2PL_SPEC.md §1).

The backbone is `timm.create_model(name, features_only=True, output_stride=...)`; the head takes the stride-4
feature (low level), the last feature (ASPP) and, for the optional auxiliary head, the one before the last.
The published layout options and the checked weight loading are in backbone.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import create_backbone
from .blocks import conv_bn_relu, head as _head


class ASPP(nn.Module):
    """Image pooling + 1x1 + three dilated 3x3 branches, concatenated and fused (spec §1)."""

    def __init__(self, cin: int, channels: int, dilations: list[int], dropout: float):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList([conv_bn_relu(cin, channels, 1)] +
                                      [conv_bn_relu(cin, channels, 3, d) for d in dilations])
        self.fuse = nn.Sequential(conv_bn_relu(channels * (2 + len(dilations)), channels, 3), nn.Dropout2d(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = F.interpolate(self.pool(x), size=(h, w), mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([pooled] + [b(x) for b in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """Student/teacher network: returns {"pred": logits at stride 4, "rep": features at stride 4, "aux"?}."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool = False, pretrained_path: str = "",
                 output_stride: int = 8, aspp_dilations=(12, 24, 36), head_channels: int = 256,
                 low_level_channels: int = 256, rep_dim: int = 256, dropout: float = 0.1, aux_head: bool = False,
                 multi_grid=(), stem_ceil_mode: bool = False, allow_partial_load: bool = False,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, output_stride, pretrained, pretrained_path, multi_grid,
                                        stem_ceil_mode, allow_partial_load, backbone_kwargs)
        reductions = self.backbone.feature_info.reduction()
        channels = self.backbone.feature_info.channels()
        if 4 not in reductions:
            raise ValueError(f"backbone {backbone!r} has no stride-4 feature (reductions {reductions})")
        self.low_index = reductions.index(4)
        self.high_index = len(channels) - 1
        self.aux_index = len(channels) - 2
        self.aspp = ASPP(channels[self.high_index], head_channels, list(aspp_dilations), dropout)
        self.low_level = conv_bn_relu(channels[self.low_index], low_level_channels, 1)
        fused = head_channels + low_level_channels
        self.classifier = _head(fused, head_channels, num_classes, dropout)
        self.representation = _head(fused, head_channels, rep_dim, dropout)
        self.aux = None
        if aux_head:
            self.aux = nn.Sequential(conv_bn_relu(channels[self.aux_index], head_channels, 3), nn.Dropout2d(dropout),
                                     nn.Conv2d(head_channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> dict:
        feats = self.backbone(x)
        low = self.low_level(feats[self.low_index])
        high = self.aspp(feats[self.high_index])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        fused = torch.cat([high, low], dim=1)
        out = {"pred": self.classifier(fused), "rep": self.representation(fused)}
        if self.aux is not None:
            out["aux"] = self.aux(feats[self.aux_index])
        return out


def build_model(model_cfg, num_classes: int) -> nn.Module:
    """DeepLabV3Plus on a CNN backbone, or the DPT-style ViTSegmenter on a ViT (vit_* / eva* timm names)."""
    from .vit import ViTSegmenter, is_vit

    if is_vit(model_cfg.backbone):
        if model_cfg.aux_head:
            raise ValueError("model.aux_head: not available with a ViT backbone")
        return ViTSegmenter(
            model_cfg.backbone, num_classes, pretrained=model_cfg.pretrained,
            pretrained_path=model_cfg.pretrained_path, blocks=model_cfg.vit_blocks,
            channels=model_cfg.head_channels, rep_dim=model_cfg.rep_dim, dropout=model_cfg.dropout,
            drop_path=model_cfg.drop_path, freeze_backbone=model_cfg.freeze_backbone,
            grad_checkpointing=model_cfg.grad_checkpointing, allow_partial_load=model_cfg.allow_partial_load,
            backbone_kwargs=model_cfg.backbone_kwargs)
    if model_cfg.freeze_backbone:
        raise ValueError("model.freeze_backbone: only for ViT backbones")
    return DeepLabV3Plus(
        backbone=model_cfg.backbone, num_classes=num_classes, pretrained=model_cfg.pretrained,
        pretrained_path=model_cfg.pretrained_path, output_stride=model_cfg.output_stride,
        aspp_dilations=model_cfg.aspp_dilations, head_channels=model_cfg.head_channels,
        low_level_channels=model_cfg.low_level_channels, rep_dim=model_cfg.rep_dim, dropout=model_cfg.dropout,
        aux_head=model_cfg.aux_head, multi_grid=model_cfg.multi_grid, stem_ceil_mode=model_cfg.stem_ceil_mode,
        allow_partial_load=model_cfg.allow_partial_load, backbone_kwargs=model_cfg.backbone_kwargs)


def convert_sync_bn(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """SyncBatchNorm across ranks (the published runs) when a process group of >1 ranks exists on GPUs.

    torch's SyncBatchNorm has no CPU kernel, so CPU (gloo) runs keep per-rank BatchNorm.
    """
    import torch.distributed as dist
    multi_rank = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if enabled and multi_rank and device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
