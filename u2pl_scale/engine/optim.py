"""SGD (or AdamW) with a head learning-rate multiplier, optional layer-wise LR decay and no weight decay on norms and
biases (ViT recipes), and the per-step poly schedule (U2PL_SPEC.md §8)."""
from __future__ import annotations

import torch


# ViT tokens and embeddings that take no weight decay in the AdamW recipes (with every bias and norm)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "register_tokens")


def _layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: 0 for a ViT's embeddings, i + 1 for block i, num_layers + 1
    for everything after the blocks (final norm, decoder, heads)."""
    if not name.startswith("backbone."):
        return num_layers + 1
    rest = name[len("backbone."):]
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    if rest.startswith(("patch_embed", "rope", *NO_DECAY_NAMES)):
        return 0
    return num_layers + 1


def param_groups(model: torch.nn.Module, lr: float, head_multiplier: float, weight_decay: float,
                 layer_decay: float = 1.0, no_decay_norm_bias: bool = False) -> list[dict]:
    """Encoder and head groups (head LR = lr x head_multiplier). With no_decay_norm_bias, biases, norms and ViT
    embeddings get no weight decay; with layer_decay < 1 a ViT's block i gets lr x layer_decay^(L + 1 - (i + 1))
    (L blocks; embeddings one step further down). Frozen parameters are left out."""
    blocks = getattr(getattr(model, "backbone", None), "blocks", None)
    num_layers = len(blocks) if layer_decay != 1.0 and blocks is not None else 0
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = not name.startswith("backbone.")
        layer = _layer_id(name, num_layers) if num_layers else 0
        no_decay = no_decay_norm_bias and (param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES)
        key = (head, layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer) if num_layers and not head else 1.0
            groups[key] = {"params": [], "lr": lr * scale * (head_multiplier if head else 1.0),
                           "weight_decay": 0.0 if no_decay else weight_decay,
                           "name": ("head" if head else "backbone") + (f".layer{layer}" if num_layers and not head
                                                                       else "") + (".no_decay" if no_decay else "")}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    return "; ".join(f"{g['name']}: {sum(p.numel() for p in g['params'])} params, lr {g['lr']:.3g}, "
                     f"wd {g['weight_decay']:g}" for g in optimizer.param_groups)


def build_optimizer(model: torch.nn.Module, optim_cfg, lr: float, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, optim_cfg.head_lr_multiplier, optim_cfg.weight_decay, optim_cfg.layer_decay,
                          optim_cfg.no_decay_norm_bias)
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
