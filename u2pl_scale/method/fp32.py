"""Regions that must run in fp32 whatever autocast is active outside them (losses, entropy, similarities)."""
from __future__ import annotations

import contextlib

import torch

# device types that have an autocast; others (e.g. "meta", which tests use to trace the device path) have none
_AUTOCAST_DEVICES = {"cpu", "cuda", "xpu", "hpu", "mps", "mtia", "xla"}


def fp32_region(device: torch.device):
    """Autocast switched off for `device`'s type: a no-op context where it is not on (the trainer calls the method
    outside autocast; entering and leaving an autocast context costs host time in every step) or the device type
    has none."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
