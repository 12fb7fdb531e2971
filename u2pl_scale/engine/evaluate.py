"""Evaluation: whole-image or sliding-window inference, a confusion matrix on device reduced over ranks, mIoU
(U2PL_SPEC.md §7: TP / (TP + FP + FN) accumulated over the whole set and all ranks, ignore 255)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import dist


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """[C, C] counts, rows = true class, columns = predicted class, ignoring `ignore_index`."""
    valid = label != ignore_index
    index = label.long() * num_classes + pred.long()
    index = torch.where(valid, index, torch.full_like(index, num_classes * num_classes))
    counts = torch.bincount(index.flatten(), minlength=num_classes * num_classes + 1)
    return counts[: num_classes * num_classes].view(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> tuple[float, list[float | None]]:
    """mIoU over classes that occur (in labels or predictions); per-class IoU, None for absent classes."""
    conf = conf.double().cpu()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    per_class = [float(tp[i] / union[i]) if union[i] > 0 else None for i in range(conf.shape[0])]
    present = [v for v in per_class if v is not None]
    miou = sum(present) / len(present) if present else 0.0
    return miou, per_class


def sliding_logits(model, image: torch.Tensor, num_classes: int, crop: int, stride_rate: float) -> torch.Tensor:
    """Average logits of crop x crop windows (image padded up to the crop), at image size."""
    _, _, h, w = image.shape
    pad_h, pad_w = max(0, crop - h), max(0, crop - w)
    padded = F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
    H, W = padded.shape[-2:]
    stride = max(1, int(math.ceil(crop * stride_rate)))
    rows = max(1, int(math.ceil((H - crop) / stride)) + 1)
    cols = max(1, int(math.ceil((W - crop) / stride)) + 1)
    total = torch.zeros((image.shape[0], num_classes, H, W), device=image.device)
    count = torch.zeros((1, 1, H, W), device=image.device)
    for r in range(rows):
        for c in range(cols):
            y0 = min(r * stride, H - crop)
            x0 = min(c * stride, W - crop)
            window = padded[:, :, y0:y0 + crop, x0:x0 + crop]
            logits = model(window)["pred"].float()
            total[:, :, y0:y0 + crop, x0:x0 + crop] += F.interpolate(logits, size=(crop, crop), mode="bilinear",
                                                                     align_corners=True)
            count[:, :, y0:y0 + crop, x0:x0 + crop] += 1
    return (total / count)[:, :, :h, :w]


def predict(model, image: torch.Tensor, num_classes: int, mode: str, crop: int, stride_rate: float) -> torch.Tensor:
    if mode == "sliding":
        return sliding_logits(model, image, num_classes, crop, stride_rate)
    logits = model(image)["pred"].float()
    return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)


def same_size_batches(loader, max_batch: int):
    """Merge consecutive single-image val batches of equal size into batches of up to `max_batch` images."""
    pending = []
    for batch in loader:
        if pending and (batch["image"].shape != pending[0]["image"].shape or len(pending) == max_batch):
            yield _merge(pending)
            pending = []
        pending.append(batch)
    if pending:
        yield _merge(pending)


def _merge(batches: list) -> dict:
    if len(batches) == 1:
        return batches[0]
    return {"image": torch.cat([b["image"] for b in batches]), "label": torch.cat([b["label"] for b in batches]),
            "key": [k for b in batches for k in b["key"]]}


@torch.no_grad()
def evaluate(model, loader, prepare, num_classes: int, ignore_index: int, mode: str, crop: int,
             stride_rate: float, autocast_ctx, keep_pictures: int = 0, batch_size: int = 1) -> dict:
    """Run `model` over this rank's share of the val set; returns mIoU reduced over all ranks.

    `prepare(batch)` moves a val batch to the device and normalises it -> (image, label). Equal-size images are
    evaluated `batch_size` at a time (the result does not depend on the batching: BN is in eval mode).
    """
    was_training = model.training
    model.eval()
    conf = None
    pictures = []
    for batch in same_size_batches(loader, batch_size):
        image, label = prepare(batch)
        with autocast_ctx():
            logits = predict(model, image, num_classes, mode, crop, stride_rate)
        pred = logits.argmax(1)
        cm = confusion_matrix(pred, label, num_classes, ignore_index)
        conf = cm if conf is None else conf + cm
        for i in range(min(image.shape[0], keep_pictures - len(pictures))):
            pictures.append((batch["image"][i], label[i].cpu(), pred[i].cpu()))
    if conf is None:  # this rank got no val samples: still join the reduction
        device = next(model.parameters()).device
        conf = torch.zeros((num_classes, num_classes), dtype=torch.long, device=device)
    conf = dist.all_reduce_sum(conf.clone())
    miou, per_class = iou_from_confusion(conf)
    model.train(was_training)
    return {"miou": miou, "per_class_iou": per_class, "confusion": conf.cpu(), "pictures": pictures,
            "eval_mode": mode, "bad_samples": dict(getattr(loader, "bad_counts", {}))}
