#!/usr/bin/env python
"""MSRC-21 shard sets for the semi-supervised comparison (benchmarks/semi_gain.py, configs/msrc21.yaml).

    python benchmarks/msrc_shards.py --root ../shared/data/msrc21 --out shards/msrc21 --fraction 0.125 --seed 0
    python benchmarks/msrc_shards.py ... --downscale 2   # every image and mask at half size (a CPU budget)

Writes, with the folder builder of shards/build.py (u2pl_scale.data.datasets.folder_source / write_split):
    OUT/labeled        `fraction` of train.txt (35 of 276 images at 1/8), chosen with `seed`, stratified by the
                       image category (the first number of a name) as the dataset's own split is
    OUT/unlabeled      the rest of train.txt, images only
    OUT/val            val.txt (58): model selection during training
    OUT/test           test.txt (257): the held-out set semi_gain.py --test evaluates each run's best.pt on
    OUT/full_labeled   all of train.txt with masks: the all-labels reference (semi_gain.py --full)
    OUT/labeled.txt, OUT/unlabeled.txt   the chosen names;   OUT/classes.txt   the 21 class names
The dataset stays outside the project (research use only); nothing here is needed by the tests.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from u2pl_scale.data import datasets  # noqa: E402
from u2pl_scale.data.writer import write_split  # noqa: E402

NUM_CLASSES = 21


def choose_labeled(names: list[str], fraction: float, seed: int) -> list[str]:
    """round(fraction * len(names)) names (at least 1), drawn with `seed` and spread over the categories in
    proportion to their size: each category is shuffled, and its i-th of n images gets the key (i + u) / n with u
    uniform in [0, 1); the smallest keys win. Returned in the order of `names`."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[str]] = {}
    for name in names:
        by_category.setdefault(name.split("_")[0], []).append(name)
    keys = {}
    for category in sorted(by_category):
        members = [by_category[category][i] for i in rng.permutation(len(by_category[category]))]
        for i, name in enumerate(members):
            keys[name] = (i + rng.random()) / len(members)
    count = max(1, int(fraction * len(names) + 0.5))
    chosen = set(sorted(names, key=lambda name: (keys[name], name))[:count])
    return [name for name in names if name in chosen]


def downscaled_copy(root: Path, out: Path, factor: int) -> Path:
    """images/ and masks/ of `root` at 1/factor of their size in the folder `out` (images: antialiased, PNG so
    nothing is re-compressed; masks: nearest, so every label stays a class id or void), with the list files beside
    them. Returns `out`."""
    from PIL import Image

    new_root = out
    for sub in ("images", "masks"):
        (new_root / sub).mkdir(parents=True, exist_ok=True)
    for name in ("classes.txt", "train.txt", "val.txt", "test.txt"):
        (new_root / name).write_bytes((root / name).read_bytes())
    for image_path in sorted((root / "images").glob("*.jpg")):
        mask_path = root / "masks" / f"{image_path.stem}.png"
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            if image.size != mask.size:
                raise SystemExit(f"{image_path}: image {image.size} and mask {mask.size} differ")
            size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
            small = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            small.save(new_root / "images" / f"{image_path.stem}.png")
            mask.resize(size, Image.Resampling.NEAREST).save(new_root / "masks" / mask_path.name)
    return new_root


def build(root: Path, out: Path, fraction: float, seed: int, workers: int = 1, downscale: int = 1
          ) -> dict[str, dict]:
    """Every set above; returns the manifests by set name."""
    if not 0 < fraction < 1:
        raise SystemExit(f"--fraction must be in (0, 1), got {fraction}")
    if downscale < 1:
        raise SystemExit(f"--downscale must be >= 1, got {downscale}")
    if downscale > 1:
        with tempfile.TemporaryDirectory() as folder:
            return build(downscaled_copy(root, Path(folder), downscale), out, fraction, seed, workers)
    class_names = (root / "classes.txt").read_text().split()
    if len(class_names) != NUM_CLASSES:
        raise SystemExit(f"{root / 'classes.txt'}: {len(class_names)} names, expected {NUM_CLASSES}")
    train = datasets.read_id_list(root / "train.txt")
    labeled = choose_labeled(train, fraction, seed)
    unlabeled = [name for name in train if name not in set(labeled)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "labeled.txt").write_text("".join(f"{name}\n" for name in labeled))
    (out / "unlabeled.txt").write_text("".join(f"{name}\n" for name in unlabeled))
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in class_names))

    def folder(**lists) -> datasets.DatasetSource:
        return datasets.folder_source(root / "images", root / "masks", NUM_CLASSES, ignore_index=255,
                                      class_names=class_names, name="msrc21", **lists)  # 255: void

    manifests = datasets.build_dataset(folder(labeled_list=out / "labeled.txt", unlabeled_list=out / "unlabeled.txt",
                                              val_list=root / "val.txt"), out, workers=workers)
    # the two extra sets: all train labels as a labeled set, test as a val-style (labeled, unaugmented) set
    for target, split, lists in (("full_labeled", "labeled", {"labeled_list": root / "train.txt"}),
                                 ("test", "val", {"val_list": root / "test.txt"})):
        source = folder(**lists)
        manifests[target] = write_split(out / target, split, source.name, source.splits[split], source.loader,
                                        NUM_CLASSES, class_names, workers=workers)
    return manifests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msrc21"),
                        help="the dataset: images/, masks/, classes.txt, train.txt, val.txt, test.txt")
    parser.add_argument("--out", default=str(REPO / "shards" / "msrc21"))
    parser.add_argument("--fraction", type=float, default=0.125, help="labeled share of train.txt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labeled draw")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (same output for any number)")
    parser.add_argument("--downscale", type=int, default=1,
                        help="shrink every image and mask by this factor first (2: 160 x 107 photos)")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        manifests = build(Path(args.root), Path(args.out), args.fraction, args.seed, args.workers, args.downscale)
    except datasets.DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    for name, manifest in manifests.items():
        print(f"{Path(args.out) / name}: {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
