"""SGD (or AdamW) with a head learning-rate multiplier and the per-step poly schedule (U2PL_SPEC.md §8)."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, lr: float, head_multiplier: float, weight_decay: float) -> list[dict]:
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    return [{"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
            {"params": head, "lr": lr * head_multiplier, "weight_decay": weight_decay, "name": "head"}]


def build_optimizer(model: torch.nn.Module, optim_cfg, lr: float, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, optim_cfg.head_lr_multiplier, optim_cfg.weight_decay)
    if optim_cfg.use_apex and optim_cfg.name == "sgd":
        try:  # NVIDIA apex is an optional accelerator, used only when importable and asked for
            from apex.optimizers import FusedSGD
            return FusedSGD(groups, lr=lr, momentum=optim_cfg.momentum)
        except ImportError:
            pass
    # fused kernels on CUDA; the foreach implementation (one kernel per op for all tensors) elsewhere
    fused = bool(optim_cfg.fused and device.type == "cuda")
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None, foreach=None if fused else True)
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, fused=fused or None,
                           foreach=None if fused else True)


def poly_factor(step: int, total_steps: int, power: float) -> float:
    return max(0.0, 1.0 - step / max(1, total_steps)) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_factor(step, total_steps, power))
