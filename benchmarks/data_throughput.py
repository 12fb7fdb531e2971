"""Data throughput: decode + weak augmentation images/s of the labeled train stream, per DataLoader worker count.

Writes a few shards of VOC-sized (500x375) JPEG images with PNG masks (or reads --shards), then times
`make_train_loader` at the given crop for each worker count and prints a markdown table.

    python benchmarks/data_throughput.py                       # 0, 1, 2 workers at 513 crops
    python benchmarks/data_throughput.py --shards shards/voc/labeled --workers 0 4 8
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from u2pl_scale.config import DataConfig  # noqa: E402
from u2pl_scale.data.stream import make_train_loader  # noqa: E402

NUM_CLASSES = 21


def _synthetic_sample(rng: np.random.Generator, height: int = 375, width: int = 500) -> tuple:
    """A photo-like image (smooth gradients, a few objects, mild noise) and its mask: realistic JPEG sizes."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([rows / height * 200, cols / width * 200, (rows + cols) / (height + width) * 150], axis=-1)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(3):
        top, left = rng.integers(0, height - 60), rng.integers(0, width - 60)
        bottom, right = top + rng.integers(40, 200), left + rng.integers(40, 250)
        image[top:bottom, left:right] = rng.integers(0, 256, 3)
        mask[top:bottom, left:right] = rng.integers(1, NUM_CLASSES)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    mask[rng.random((height, width)) < 0.01] = 255  # a few ignore pixels, like VOC object borders
    return image, mask


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_shards(directory: Path, num_shards: int, per_shard: int) -> Path:
    """A labeled shard set in the agreed format (tars + manifest.json)."""
    rng = np.random.default_rng(0)
    entries = []
    for index in range(num_shards):
        name = f"labeled-{index:06d}.tar"
        with wds.TarWriter(str(directory / name)) as sink:
            for i in range(per_shard):
                image, mask = _synthetic_sample(rng)
                sink.write({"__key__": f"img{index:03d}_{i:04d}", "jpg": _encode(image, "JPEG"),
                            "seg.png": _encode(mask, "PNG")})
        entries.append({"name": name, "num_samples": per_shard, "sha256": ""})
    manifest = {"format": "u2pl-shards/1", "dataset": "synthetic-voc", "split": "labeled",
                "num_samples": num_shards * per_shard, "num_classes": NUM_CLASSES, "ignore_index": 255,
                "has_masks": True, "shards": entries}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(shards: str, workers: int, crop: int, batch_size: int, batches: int) -> tuple:
    """(images/s after the first batch of every worker, CPU ms per image over the whole run).

    Wall-clock rates need an idle machine; CPU time per image (start-up included) holds up on a shared one.
    """
    cfg = DataConfig(labeled=shards, num_classes=NUM_CLASSES, crop_size=crop, num_workers=workers, shuffle_buffer=16)
    warmup = max(1, workers)
    stream = make_train_loader(cfg, "labeled", batch_size, rank=0, world_size=1, seed=0, epoch=0,
                               steps=batches + warmup)
    cpu_start = _cpu_seconds()
    iterator = iter(stream)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(batch["key"]) for batch in iterator)
    rate = count / (time.perf_counter() - start)
    return rate, 1000 * (_cpu_seconds() - cpu_start) / ((batches + warmup) * batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="labeled shard set to read (default: write a synthetic one)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--crop", type=int, default=513)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per worker count")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or str(write_shards(Path(tmp), args.num_shards, args.per_shard))
        print(f"shards: {shards if args.shards else f'{args.num_shards} x {args.per_shard} synthetic 500x375 JPEG'}, "
              f"crop {args.crop}, batch {args.batch_size}, {args.batches} timed batches; "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}\n")
        print("| workers | images/s | images/s per worker | CPU ms per image (all processes) |")
        print("| --- | --- | --- | --- |")
        for workers in args.workers:
            rate, cpu_ms = measure(shards, workers, args.crop, args.batch_size, args.batches)
            print(f"| {workers} | {rate:.1f} | {rate / max(1, workers):.1f} | {cpu_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
