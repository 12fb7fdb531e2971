"""Layers the CNN and the ViT segmentation heads share."""
from __future__ import annotations

import torch.nn as nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = 0 if kernel == 1 else dilation
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def head(cin: int, channels: int, cout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(cin, channels, 3), nn.Dropout2d(dropout),
                         conv_bn_relu(channels, channels, 3), nn.Dropout2d(dropout),
                         nn.Conv2d(channels, cout, 1))
