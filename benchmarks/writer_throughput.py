"""Shard writer throughput (images/s) on a folder of VOC-sized JPEGs (500x375) with 21-class masks.

    python benchmarks/writer_throughput.py [--images 200] [--workers 1 2] [--repeats 3]

Builds the folder once (outside the timing), then times `build_dataset` on the labeled split, i.e. what
`python shards/build.py folder ... --workers N` does after listing files: read, decode-check, validate and
histogram every mask, write the tar shards and the manifest. Prints the best of --repeats per worker count, as wall-clock images/s and
as CPU milliseconds per image (which other load on the machine does not change).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from u2pl_scale.data.datasets import build_dataset, folder_source  # noqa: E402

WIDTH, HEIGHT, NUM_CLASSES = 500, 375, 21


def make_folder(root: Path, count: int, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colour fields plus noise, about VOC's file size) and blocky masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(count):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.float32)
        image += rng.normal(0, 12, size=image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{index:05d}.jpg",
                                                                     quality=90)
        labels = rng.integers(0, NUM_CLASSES, size=(6, 8), dtype=np.uint8)
        mask = np.asarray(Image.fromarray(labels).resize((WIDTH, HEIGHT), Image.NEAREST)).copy()
        mask[::47, :] = 255  # some ignore pixels, like VOC borders
        Image.fromarray(mask).save(root / "masks" / f"{index:05d}.png")
    (root / "labeled.txt").write_text("".join(f"{index:05d}\n" for index in range(count)))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_folder(root / "folder", args.images)
        image_bytes = sum(p.stat().st_size for p in (root / "folder" / "images").iterdir())
        print(f"{args.images} JPEG {WIDTH}x{HEIGHT} (mean {image_bytes / args.images / 1000:.0f} KB) + PNG masks, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        source = folder_source(root / "folder" / "images", root / "folder" / "masks", NUM_CLASSES,
                               labeled_list=root / "folder" / "labeled.txt", ignore_index=255, splits=("labeled",))
        for workers in args.workers:
            seconds, cpu_seconds = [], []
            for repeat in range(args.repeats):
                cpu_before, started = _cpu_seconds(), time.perf_counter()
                build_dataset(source, root / f"out-{workers}-{repeat}", workers=workers, progress=False)
                seconds.append(time.perf_counter() - started)
                cpu_seconds.append(_cpu_seconds() - cpu_before)
            best = min(seconds)
            # CPU time is what the build costs whatever else runs on the machine; wall time is not.
            print(f"workers={workers}: {args.images / best:6.1f} images/s wall (best of {args.repeats}: {best:.2f} s; "
                  f"all: {', '.join(f'{s:.2f}' for s in seconds)}); "
                  f"{1000 * min(cpu_seconds) / args.images:.1f} CPU ms/image (parent + workers)")


if __name__ == "__main__":
    main()
