"""Export the evaluated network as ONNX or TorchScript with dynamic batch, height and width.

The exported graph takes float32 RGB images [B, 3, H, W] with 0..255 pixel values (normalisation is inside) and
returns logits [B, num_classes, H, W] (bilinear upsampling to the input size inside); argmax over dim 1 is the
mask. A JSON file beside it (<file>.json) records the classes, the input convention and the checkpoint's meta.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_path
from .checkpoint import LoadedCheckpoint


class ExportModel(nn.Module):
    """0..255 float images -> logits at the input size (whole-image inference, one scale)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        logits = self.model(x)["pred"]
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)


def export_model(loaded: LoadedCheckpoint, fmt: str, out: str | Path, example_size: int = 64,
                 opset: int = 17) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportModel(loaded.model.float().to(memory_format=torch.contiguous_format).cpu().eval(),
                          loaded.meta["mean"], loaded.meta["std"]).eval()
    example = torch.rand(1, 3, example_size, example_size + 8) * 255
    with atomic_path(out) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes: the sizes are traced as dynamic values
        if fmt == "onnx":
            torch.onnx.export(wrapper, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch", 2: "height", 3: "width"}},
                              opset_version=opset, dynamo=False)
        elif fmt == "torchscript":
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            traced = torch.jit.freeze(traced)
            traced.save(str(tmp))
        else:
            raise ValueError(f"format {fmt!r}: expected onnx or torchscript")
    side = {"format": fmt, "input": {"name": "images", "shape": ["batch", 3, "height", "width"],
                                     "dtype": "float32", "range": "0..255 RGB (normalised inside)"},
            "output": {"name": "logits", "shape": ["batch", loaded.num_classes, "height", "width"],
                       "mask": "argmax over dim 1"},
            "class_names": loaded.class_names, "checkpoint": str(loaded.path),
            "meta": {k: v for k, v in loaded.meta.items() if k != "config"}}
    with atomic_path(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json.dumps(side, indent=2) + "\n")
    return out
