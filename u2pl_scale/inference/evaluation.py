"""Evaluate a checkpoint on a labeled shard set: one confusion matrix over the set, reduced once over all ranks;
mIoU, per-class IoU (class names), pixel accuracy, a confusion-matrix PNG and a JSON report."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import dist
from ..atomic import atomic_path, write_json_atomic
from ..config import DataConfig, config_from_dict
from ..data import stream
from ..engine.evaluate import confusion_matrix, iou_from_confusion, same_size_batches
from .checkpoint import LoadedCheckpoint
from .predictor import Predictor, center_box


def data_config(loaded: LoadedCheckpoint, data: Optional[str], num_workers: Optional[int] = None) -> DataConfig:
    """The run's data settings (decoding, bad-sample policy, val batch size) with `data` as the val set."""
    raw = loaded.config
    try:
        cfg = config_from_dict(raw).data if raw else DataConfig()
    except Exception:  # noqa: BLE001  (a config from another version: keep what the meta says)
        cfg = DataConfig()
    cfg = dataclasses.replace(cfg, num_classes=loaded.num_classes, ignore_index=int(loaded.meta["ignore_index"]),
                              mean=list(loaded.meta["mean"]), std=list(loaded.meta["std"]))
    if data:
        cfg.val = data
    if num_workers is not None:
        cfg.num_workers = num_workers
    return cfg


def class_names_for(loaded: LoadedCheckpoint, data) -> list[str]:
    """The checkpoint's class names; where it has none, those of the data set's manifest (when local and of the
    same class count); else class_0, class_1, ..."""
    if loaded.meta.get("class_names"):
        return loaded.class_names
    if isinstance(data, str) and "://" not in data and not data.startswith("pipe:"):
        p = Path(data)
        manifest = p / "manifest.json" if p.is_dir() else p
        try:
            names = json.loads(manifest.read_text()).get("class_names") if manifest.suffix == ".json" else None
        except (OSError, ValueError):
            names = None
        if names and len(names) == loaded.num_classes:
            return [str(n) for n in names]
    return loaded.class_names


@torch.no_grad()
def confusion_over_set(predictor: Predictor, data_cfg: DataConfig, rank: int, world: int,
                       batch_size: int) -> tuple[torch.Tensor, int, dict]:
    """(confusion [C, C] summed over all ranks, images seen over all ranks, skipped samples over all ranks)."""
    loader = stream.make_val_loader(data_cfg, rank, world)
    n = predictor.num_classes
    conf = torch.zeros((n, n), dtype=torch.long, device=predictor.device)
    images = 0
    for batch in same_size_batches(loader, batch_size):
        image, label = batch["image"], batch["label"]
        if predictor.mode == "center":
            top, left, bottom, right = center_box(image.shape[-2], image.shape[-1], predictor.crop)
            label = label[:, top:bottom, left:right]
        pred = predictor.logits(image).argmax(1)
        conf += confusion_matrix(pred, label.to(predictor.device).long(), n, data_cfg.ignore_index)
        images += image.shape[0]
    # one reduction for the matrix; the counts ride along in a second small tensor
    conf = dist.all_reduce_sum(conf)
    seen = dist.all_reduce_sum(torch.tensor([images], dtype=torch.long, device=predictor.device))
    bad = dist.sum_counts(dict(getattr(loader, "bad_counts", {})))
    return conf.cpu(), int(seen.item()), bad


def report(conf: torch.Tensor, class_names: list[str], setting: dict, extra: dict) -> dict:
    miou, per_class = iou_from_confusion(conf)
    total = int(conf.sum())
    pixel_acc = float(conf.diag().sum()) / total if total else 0.0
    return {
        "miou": miou,
        "pixel_accuracy": pixel_acc,
        "per_class_iou": {name: iou for name, iou in zip(class_names, per_class)},
        "class_names": class_names,
        "eval_mode": setting["mode"],
        "scales": setting["scales"],
        "flip": setting["flip"],
        "setting": setting,
        "pixels": total,
        "confusion": conf.tolist(),
        **extra,
    }


def format_report(rep: dict) -> str:
    tag = f"{rep['eval_mode']}, scales {','.join(f'{s:g}' for s in rep['scales'])}{', flip' if rep['flip'] else ''}"
    lines = [f"mIoU {100 * rep['miou']:.2f} ({tag})", f"pixel accuracy {100 * rep['pixel_accuracy']:.2f} ({tag})"]
    width = max(len(n) for n in rep["class_names"])
    for name, iou in rep["per_class_iou"].items():
        lines.append(f"  {name:<{width}}  " + ("   n/a" if iou is None else f"{100 * iou:6.2f}"))
    return "\n".join(lines)


def save_confusion_png(path: Path, conf: torch.Tensor, class_names: list[str], title: str) -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), cells shaded white -> blue,
    with the row percentage written in each cell."""
    from PIL import Image, ImageDraw, ImageFont

    c = conf.double().numpy()
    rows = c.sum(1, keepdims=True)
    norm = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    n = len(class_names)
    cell = 44 if n <= 30 else max(8, 1300 // n)
    font = ImageFont.load_default()
    label_w = 8 + 7 * max(len(s) for s in class_names) if cell >= 20 else 8
    top = 40 + (label_w if cell >= 20 else 0)
    left = label_w
    size = (left + n * cell + 10, top + n * cell + 24)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black", font=font)
    draw.text((4, 20), "rows: true class, columns: predicted (row-normalised)", fill="black", font=font)
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            colour = (int(255 * (1 - v)), int(255 * (1 - 0.6 * v)), 255)
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(200, 200, 200))
            if cell >= 20:
                draw.text((x0 + 3, y0 + cell // 2 - 5), f"{100 * v:.0f}", fill="black" if v < 0.6 else "white",
                          font=font)
        if cell >= 20:
            draw.text((4, top + i * cell + cell // 2 - 5), class_names[i], fill="black", font=font)
    if cell >= 20:  # column labels, written vertically
        for j, name in enumerate(class_names):
            label = Image.new("RGB", (label_w, 12), "white")
            ImageDraw.Draw(label).text((2, 0), name, fill="black", font=font)
            img.paste(label.rotate(90, expand=True), (left + j * cell + cell // 2 - 6, 36))
    with atomic_path(path) as tmp:
        img.save(tmp)


def write_outputs(out_dir: Path, rep: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{rep['eval_mode']}, scales {','.join(f'{s:g}' for s in rep['scales'])}{', flip' if rep['flip'] else ''}"
    png = out_dir / "confusion.png"
    save_confusion_png(png, torch.tensor(rep["confusion"]), rep["class_names"],
                       f"mIoU {100 * rep['miou']:.2f}  pixel acc {100 * rep['pixel_accuracy']:.2f}  ({tag})")
    js = out_dir / "report.json"
    write_json_atomic(js, rep)
    return js, png
