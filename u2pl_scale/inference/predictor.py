"""Image -> mask with a trained model: whole image, sliding windows or the centre crop, optionally several scales
and a horizontal flip (their softmax probabilities averaged).

One scale (1.0) without flip in "whole" or "sliding" mode is the trainer's own evaluation
(u2pl_scale/engine/evaluate.py predict): same calls, same autocast, same memory format, so the same figures.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.transforms import normalize
from ..engine.evaluate import predict as engine_predict
from ..precision import autocast, native_bf16, resolve_precision

MODES = ("whole", "sliding", "center")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(device)


def pick_precision(precision: str, device: torch.device, recorded: Optional[str] = None) -> str:
    """auto: the precision the run evaluated with (recorded in the checkpoint) when this device runs it natively,
    else bf16 where native, else fp32."""
    if precision != "auto":
        return resolve_precision(precision, device)
    if recorded == "fp32" or (recorded in ("bf16", "fp16") and device.type == "cuda"):
        return recorded
    if recorded == "bf16" and native_bf16(device):
        return "bf16"
    return resolve_precision("auto", device)


def parse_scales(text: str | Sequence[float] | None) -> list[float]:
    if text is None or text == "":
        return [1.0]
    values = [float(v) for v in text.split(",")] if isinstance(text, str) else [float(v) for v in text]
    if not values or min(values) <= 0:
        raise ValueError(f"scales: expected positive numbers, got {text!r}")
    return values


def center_box(h: int, w: int, crop: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the central crop x crop window (the whole side where it is shorter)."""
    ch, cw = min(h, crop), min(w, crop)
    top, left = (h - ch) // 2, (w - cw) // 2
    return top, left, top + ch, left + cw


class Predictor:
    def __init__(self, model: torch.nn.Module, meta: dict, mode: str = "whole", crop: Optional[int] = None,
                 stride_rate: Optional[float] = None, scales: Sequence[float] = (1.0,), flip: bool = False,
                 device: str | torch.device = "cpu", precision: str = "auto",
                 channels_last: Optional[bool] = None):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        eval_meta = meta.get("eval") or {}
        self.meta = meta
        self.mode = mode
        self.crop = int(crop or eval_meta.get("crop_size") or 513)
        self.stride_rate = float(stride_rate or eval_meta.get("stride_rate") or 2.0 / 3.0)
        self.scales = list(scales)
        self.flip = bool(flip)
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.precision = pick_precision(precision, self.device, meta.get("precision"))
        self.channels_last = meta.get("channels_last", False) if channels_last is None else channels_last
        self.num_classes = int(meta["num_classes"])
        self.mean, self.std = meta["mean"], meta["std"]
        model = model.to(self.device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    def describe(self) -> dict:
        return {"mode": self.mode, "scales": self.scales, "flip": self.flip, "crop": self.crop,
                "stride_rate": self.stride_rate, "precision": self.precision, "device": str(self.device)}

    def _base(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        """Logits at the image's size, one scale, no flip (the trainer's evaluation)."""
        with autocast(self.precision, self.device):
            return engine_predict(self.model, image, self.num_classes, mode, self.crop, self.stride_rate).float()

    @torch.no_grad()
    def logits(self, images: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """uint8 (or 0..255 float) images [B, 3, H, W] -> float scores [B, C, H, W] on the device: logits for one
        scale without flip, else averaged softmax probabilities. In "center" mode the input is cropped to the
        central window first (the output has the window's size)."""
        mode = mode or self.mode
        images = images.to(self.device, non_blocking=True)
        if mode == "center":
            top, left, bottom, right = center_box(images.shape[-2], images.shape[-1], self.crop)
            images = images[:, :, top:bottom, left:right]
            mode = "whole"
        x = normalize(images, self.mean, self.std, self.channels_last)
        if self.scales == [1.0] and not self.flip:
            return self._base(x, mode)
        h, w = x.shape[-2:]
        total = None
        for scale in self.scales:
            size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
            xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=True)
            views = [(xs, False)] + ([(xs.flip(-1), True)] if self.flip else [])
            for view, flipped in views:
                out = self._base(view, mode)
                if flipped:
                    out = out.flip(-1)
                if out.shape[-2:] != (h, w):
                    out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
                prob = out.softmax(1)
                total = prob if total is None else total + prob
        return total / (len(self.scales) * (2 if self.flip else 1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> class index masks [B, H, W] (int64, on the CPU)."""
        return self.logits(images, mode).argmax(1).cpu()
