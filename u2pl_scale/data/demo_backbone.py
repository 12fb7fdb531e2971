"""A pretrained backbone for the demo, made here: the stand-in for ImageNet weights, which cannot be downloaded.

The published U2PL settings start every run, supervised or semi-supervised, from an ImageNet-pretrained backbone.
From scratch, in a CPU budget of minutes, the demo's segmentation model is limited by how slowly it learns shape
and texture, not by how many labels it has, so a semi-supervised method has nothing to add. This module
pretrains a timm backbone the way ImageNet weights are made: image-level classification on a separate, larger
labeled set.

The pretraining set is generated, never taken from the demo: single-object images (seed stream 7, disjoint from
the demo's train and val streams) labeled with the object's SHAPE and TEXTURE (5 + 5 classes, two linear heads on
the pooled features). Hue is uniform over the whole circle and texture independent of shape, so the demo's
classes (shape + usual texture + hue family, on images with several objects) are not the pretraining labels, just
as VOC's classes are not ImageNet's. Deterministic for a given seed, steps, thread count and precision (bf16 under
autocast where the CPU runs it natively, else fp32: precision.resolve_precision). The weights are saved
as safetensors (no pickle) with a JSON sidecar holding the settings and held-out accuracies.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path, write_json_atomic
from ..precision import resolve_precision
from . import demo

PRETRAIN_STREAM = 7  # demo.generate_sample uses streams 0 (train) and 1 (val)
HELD_OUT_OFFSET = 10 ** 7  # indices of the held-out check images
DEMO_BACKBONE_VERSION = "demo-backbone-v1"


@dataclass(frozen=True)
class PretrainSettings:
    backbone: str = "resnet10t"
    size: int = 48
    num_images: int = 8192
    steps: int = 1000
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 0
    held_out: int = 512


def pretrain_sample(seed: int, index: int, size: int = 48) -> tuple[np.ndarray, int, int]:
    """(image uint8 HxWx3, shape id, texture id): one object near the centre on a cluttered demo background."""
    rng = np.random.default_rng([seed, PRETRAIN_STREAM, index])
    image = demo._background(size, rng)
    shape_id, texture_id = int(rng.integers(0, len(demo.SHAPES))), int(rng.integers(0, len(demo.TEXTURES)))
    region, cy, cx = demo._place_shape(size, demo.SHAPES[shape_id], (0.22, 0.4), (0.35, 0.65), rng)
    pattern = demo._texture_pattern(size, demo.TEXTURES[texture_id], cy, cx, rng)
    demo._paint_hue(image, region, pattern, rng.uniform(), rng)
    return demo._add_noise(image, rng), shape_id, texture_id


def _batch(settings: PretrainSettings, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised channels-last images [N, 3, S, S] and their shape and texture labels."""
    from ..config import DataConfig
    from .transforms import normalize

    samples = [pretrain_sample(settings.seed, int(i), settings.size) for i in indices]
    images = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2)
    data = DataConfig()  # the default mean/std, as training normalises
    images = normalize(images, data.mean, data.std, channels_last=True)
    return images, torch.tensor([s[1] for s in samples]), torch.tensor([s[2] for s in samples])


def pretrain_backbone(out_path: Union[str, Path], settings: PretrainSettings = PretrainSettings(),
                      progress: bool = True) -> dict:
    """Pretrain `settings.backbone` (timm, features_only) and write its weights to `out_path` (.safetensors)
    and a `<out_path>.json` report; returns the report."""
    import timm
    from safetensors.torch import save_file

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"demo backbone: write a .safetensors file, not {out_path.name}")
    started = time.perf_counter()
    images, shapes, textures = _batch(settings, range(settings.num_images))
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    backbone = timm.create_model(settings.backbone, features_only=True, pretrained=False)
    backbone = backbone.to(memory_format=torch.channels_last)
    head = torch.nn.Linear(backbone.feature_info.channels()[-1], len(demo.SHAPES) + len(demo.TEXTURES))
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=1e-4, nesterov=True)

    # train.precision=auto's rule: bf16 where this CPU runs it natively; emulated bf16 (AVX2-only CPUs) made this
    # pretraining 8x slower than fp32
    precision = resolve_precision("auto", torch.device("cpu"))

    def logits(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pooled = backbone(x)[-1].float().mean((2, 3))
        return head(pooled)

    backbone.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:  # cosine to zero
            group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        index = torch.randint(0, settings.num_images, (settings.batch_size,), generator=generator)
        flip = torch.rand(settings.batch_size, generator=generator) < 0.5
        x = images[index]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        out = logits(x)
        loss = (F.cross_entropy(out[:, : len(demo.SHAPES)], shapes[index])
                + F.cross_entropy(out[:, len(demo.SHAPES):], textures[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress and (step + 1) % 100 == 0:
            print(f"[demo-backbone] step {step + 1}/{settings.steps} loss {loss.item():.3f}", flush=True)

    backbone.eval()
    with torch.no_grad():
        x, shape_true, texture_true = _batch(settings, range(HELD_OUT_OFFSET, HELD_OUT_OFFSET + settings.held_out))
        out = logits(x)
    report = {
        "version": DEMO_BACKBONE_VERSION,
        "settings": asdict(settings),
        "held_out_shape_accuracy": float((out[:, : len(demo.SHAPES)].argmax(1) == shape_true).float().mean()),
        "held_out_texture_accuracy": float((out[:, len(demo.SHAPES):].argmax(1) == texture_true).float().mean()),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),  # speed only: the weights do not depend on it
        "seconds": round(time.perf_counter() - started, 1),
    }
    state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata={"version": DEMO_BACKBONE_VERSION, "backbone": settings.backbone})
    write_json_atomic(out_path.with_name(out_path.name + ".json"), report)  # written last: marks a finished build
    return report


def demo_backbone_ready(path: Union[str, Path], settings: PretrainSettings = PretrainSettings()) -> bool:
    """True when `path` holds a finished build of this version with these settings."""
    report_path = Path(str(path) + ".json")
    if not (Path(path).is_file() and report_path.is_file()):
        return False
    report = json.loads(report_path.read_text())
    return report.get("version") == DEMO_BACKBONE_VERSION and report.get("settings") == asdict(settings)
