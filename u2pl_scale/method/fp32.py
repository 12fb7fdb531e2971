"""Regions that must run in fp32 whatever autocast is active outside them (losses, entropy, similarities)."""
from __future__ import annotations

import contextlib

import torch


def fp32_region(device: torch.device):
    """Autocast switched off for `device`'s type: a no-op context where it is not on (the trainer calls the method
    outside autocast; entering and leaving an autocast context costs host time in every step) or the device type
    has none (e.g. "meta", where benchmarks count the method's ops)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
