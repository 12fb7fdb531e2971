"""Run-directory outputs written by rank 0: metrics.jsonl, TensorBoard events, a progress bar, the PNG grid of val
predictions and summary.json. Other ranks get a writer that does nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_path


def _palette(num_classes: int) -> np.ndarray:
    """The VOC colour map (bit-interleaved), white for ignore."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[255] = (255, 255, 255)
    return pal


def save_prediction_grid(path: Path, pictures: list, num_classes: int) -> None:
    """One row per val image: image | ground truth | prediction."""
    from PIL import Image
    if not pictures:
        return
    pal = _palette(num_classes)
    rows = []
    width = max(p[0].shape[-1] for p in pictures)
    for image, label, pred in pictures:
        img = image.permute(1, 2, 0).numpy().astype(np.uint8)
        gt = pal[label.numpy().astype(np.uint8)]
        pr = pal[pred.numpy().astype(np.uint8)]
        row = np.concatenate([img, gt, pr], axis=1)
        pad = 3 * width - row.shape[1]
        rows.append(np.pad(row, ((0, 2), (0, pad), (0, 0))))
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunOutputs:
    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, start_step: int, progress_bar: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def write_config(self, text: str) -> None:
        if self.enabled:
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(text)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": prefix, **metrics}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        for k, v in metrics.items():
            if _is_number(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            elif isinstance(v, list) and v and all(map(_is_number, v)):  # per-class values: one curve per class
                for index, value in enumerate(v):
                    self.tb.add_scalar(f"{prefix}/{k}/{index}", value, step)
        if self.bar is not None and prefix == "train":
            short = {k: metrics[k] for k in ("loss", "sup", "unsup", "contra", "lr", "reliable") if k in metrics}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()})

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.flush()
        self.tb.close()
        self.metrics_file.close()

