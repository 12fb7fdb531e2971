"""The timm backbone: published-layout options (multi-grid, stem max-pool) and checked weight loading.

The published U2PL ResNet-101 (U2PL_SPEC.md §1) is timm's `resnet101s` layout (deep stem 64/64/128, layer1 on 128
channels) with two changes applied here after timm builds the features_only model: layer4's three blocks dilated
4/8/16 (`model.multi_grid`) and the stem max-pool with ceil_mode (`model.stem_ceil_mode`). Neither changes a
tensor, so checkpoints load the same either way.

Weights from `model.pretrained_path` must fit completely: a backbone tensor left at its random init, or a file
tensor that is not used, raises ValueError (a warning with `model.allow_partial_load`). The published checkpoint
names its deep stem exactly as timm does (conv1.0/conv1.1/conv1.3/conv1.4/conv1.6/bn1); checkpoints that name it
conv1/bn1/conv2/bn2/conv3/bn3 (PSPNet-style deep-base ResNets) are renamed by STEM_RENAMES.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import timm
import torch
import torch.nn as nn

# Deep stem named conv1/bn1/conv2/bn2/conv3/bn3 -> timm's nn.Sequential conv1 (ReLUs at 2 and 5) and bn1.
STEM_RENAMES = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4", "conv3": "conv1.6",
                "bn3": "bn1"}
# Wrappers that training scripts put around a backbone's names (DDP, segmentation models, EMA holders).
PREFIXES = ("module.", "backbone.", "encoder.", "model.")
LIST_LIMIT = 20


def create_backbone(name: str, output_stride: int = 8, pretrained: bool = False, pretrained_path: str = "",
                    multi_grid: Sequence[int] = (), stem_ceil_mode: bool = False,
                    allow_partial_load: bool = False, backbone_kwargs: dict | None = None) -> nn.Module:
    """timm features_only backbone with the weights loaded and checked and the published-layout options applied
    (they change no tensor, so the order does not matter)."""
    backbone = create_checked(name, pretrained, pretrained_path, allow_partial_load, features_only=True,
                              output_stride=output_stride, **(backbone_kwargs or {}))
    if multi_grid:
        apply_multi_grid(backbone, multi_grid, name)
    if stem_ceil_mode:
        pool = getattr(backbone, "maxpool", None)
        if not isinstance(pool, nn.MaxPool2d):
            raise ValueError(f"model.stem_ceil_mode: backbone {name!r} has no stem max-pool (nn.MaxPool2d 'maxpool')")
        pool.ceil_mode = True
    return backbone


def create_checked(name: str, pretrained: bool, pretrained_path: str, allow_partial_load: bool,
                   **create_kwargs) -> nn.Module:
    """timm.create_model(name, **create_kwargs) with pretrained weights from the hub (pretrained, no path) or from
    pretrained_path, either load checked to be complete (allow_partial_load: a warning instead of an error)."""
    use_hub = pretrained and not pretrained_path
    with _timm_load_report(use_hub) as report:
        try:
            model = timm.create_model(name, pretrained=use_hub, **create_kwargs)
        except (OSError, RuntimeError) as error:  # the hub's errors (offline, no cache, unknown tag) derive from these
            if not use_hub:
                raise
            raise RuntimeError(
                f"model.backbone={name}: its pretrained weights could not be fetched from the timm hub (no network, "
                f"or not cached): {type(error).__name__}: {error}. Download them where there is a network and pass the "
                f"file as model.pretrained_path=<.safetensors/.pth>, or train from scratch with model.pretrained=false"
            ) from error
    if use_hub:
        _check_hub_load(name, report, allow_partial_load)
    if pretrained and pretrained_path:
        load_backbone_weights(model, pretrained_path, allow_partial_load, name)
    return model


def apply_multi_grid(backbone: nn.Module, dilations: Sequence[int], name: str = "") -> None:
    """Set the dilation (and the padding that keeps the size) of each 3x3 conv of the last ResNet stage."""
    from timm.models.resnet import Bottleneck

    stage_name = backbone.feature_info.module_name()[-1]
    stage = dict(backbone.named_children()).get(stage_name.replace(".", "_"))
    blocks = list(stage) if isinstance(stage, nn.Sequential) else []
    if not blocks or not all(isinstance(b, Bottleneck) for b in blocks):
        raise ValueError(f"model.multi_grid: backbone {name!r} has no ResNet bottleneck stage as its last stage "
                         f"({stage_name!r}); use [] for this backbone")
    if len(dilations) != len(blocks):
        raise ValueError(f"model.multi_grid: backbone {name!r} has {len(blocks)} blocks in its last stage "
                         f"{stage_name!r}, got {len(dilations)} dilations {list(dilations)}")
    for block, d in zip(blocks, dilations):
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"model.multi_grid: dilations must be positive integers, got {list(dilations)}")
        block.conv2.dilation = (d, d)
        block.conv2.padding = (d, d)  # 3x3 kernel: padding = dilation keeps the spatial size


def read_state_dict(path: Path) -> dict:
    """Tensors of a .pth/.pt/.safetensors file, without unpickling arbitrary objects; unwraps checkpoint dicts."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained_path: {path} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _name_candidates(key: str, stem_renames: bool) -> Iterator[str]:
    """The key, then the key with wrapper prefixes stripped one by one (own names may start with one too)."""
    while True:
        if stem_renames:
            head, dot, rest = key.partition(".")
            yield STEM_RENAMES.get(head, head) + dot + rest
        else:
            yield key
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return
        key = key[len(prefix):]


def _strip(key: str) -> str:
    return list(_name_candidates(key, False))[-1]


def _classifier_names(name: str) -> tuple[str, ...]:
    """Module names of the model's ImageNet classifier ('fc' for ResNets), which features_only models drop."""
    names = ["fc"]
    with contextlib.suppress(Exception):
        cls = timm.models.get_pretrained_cfg(name).classifier
        names += [cls] if isinstance(cls, str) else list(cls or ())
    return tuple(dict.fromkeys(names))


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LIST_LIMIT])
    return shown + (f", ... ({len(names) - LIST_LIMIT} more)" if len(names) > LIST_LIMIT else "")


def load_backbone_weights(backbone: nn.Module, path: str, allow_partial: bool = False, name: str = "") -> None:
    """Load `path` into the backbone; every backbone tensor must come from the file and every file tensor be used
    (the classifier of an ImageNet checkpoint excepted), else ValueError (warning when allow_partial)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained_path: weights file not found: {p}")
    state = read_state_dict(p)
    own = backbone.state_dict()
    stripped = {_strip(k) for k in state}
    # A PSPNet-style deep stem has top-level conv2/conv3; timm's deep stem keeps them inside conv1.
    stem_renames = ("conv1.0.weight" in own and "conv2.weight" in stripped and "conv3.weight" in stripped
                    and "conv1.0.weight" not in stripped)
    classifier = _classifier_names(name)
    matched, unused, mismatched, expected = {}, [], [], []
    for key, value in state.items():
        target = next((c for c in _name_candidates(key, stem_renames) if c in own), None)
        if target is None or target in matched:
            short = _strip(key)
            is_classifier = any(short.startswith(c + ".") for c in classifier)
            (expected if is_classifier and target is None else unused).append(key)
        elif own[target].shape != value.shape:
            mismatched.append(f"{key} (file {list(value.shape)} vs model {list(own[target].shape)})")
        else:
            matched[target] = value
    if not matched:
        raise ValueError(f"model.pretrained_path: no tensor in {p} matches backbone {name!r}")
    backbone.load_state_dict(matched, strict=False)
    # BatchNorm's step counters carry no weights: a file without them still loads completely.
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    unused = [k for k in unused if not k.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"{len(missing)} backbone tensors not in the file (left at random init): {_listing(missing)}")
    if unused:
        problems.append(f"{len(unused)} file tensors not used: {_listing(unused)}")
    if mismatched:
        problems.append(f"{len(mismatched)} file tensors with the wrong shape: {_listing(mismatched)}")
    if problems:
        message = (f"model.pretrained_path: {p} does not fit backbone {name!r}: " + "; ".join(problems)
                   + " (model.allow_partial_load=true loads it anyway)")
        if not allow_partial:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    note = f"; not used, the checkpoint's classifier: {', '.join(expected)}" if expected else ""
    print(f"[u2pl] model.pretrained_path: loaded {len(matched)} backbone tensors from {p}{note}", flush=True)


@contextlib.contextmanager
def _timm_load_report(enabled: bool = True) -> Iterator[list]:
    """Collect timm's pretrained-load messages: for features_only models timm loads non-strictly and reports
    missing and unexpected keys only through its logger (at INFO level for missing ones)."""
    messages: list = []
    if not enabled:
        yield messages
        return
    logger = logging.getLogger("timm.models._builder")
    records: list = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, level, propagate = Collect(logging.INFO), logger.level, logger.propagate
    shown_level = logger.getEffectiveLevel()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # lowering the level must not print what the user's logging setup hides
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        messages.extend(r.getMessage() for r in records)
        for record in records:  # hand on what timm's logger would have shown anyway
            if record.levelno >= shown_level:
                logger.handle(record)


def _check_hub_load(name: str, messages: list, allow_partial: bool) -> None:
    """Apply the pretrained_path rule to timm's hub load, from its messages (the classifier is expected)."""
    classifier = _classifier_names(name)
    problems = []
    for text in messages:
        found = re.match(r"(Missing|Unexpected) keys \((.*)\) (discovered|found) while loading", text)
        if found:
            keys = [k for k in found.group(2).split(", ") if k and not k.endswith("num_batches_tracked")]
            if found.group(1) == "Missing":
                keys = [k for k in keys if not any(k.startswith(c + ".") for c in classifier)]
            if keys:
                what = "backbone tensors not in the weights" if found.group(1) == "Missing" else "weights not used"
                problems.append(f"{len(keys)} {what}: {_listing(keys)}")
        elif "random init" in text:
            problems.append(text)
    if problems:
        message = (f"model.pretrained: timm's pretrained weights for {name!r} do not fit the backbone: "
                   + "; ".join(problems) + " (model.allow_partial_load=true loads them anyway)")
        if not allow_partial:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
