"""COCO 2017 reader: instance annotations (polygons, RLE) rasterised to 81-class semantic masks in numpy, so
pycocotools is not needed. Part of the dataset readers of u2pl_scale.data.datasets, which re-exports it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from u2pl_scale.data.dataset_base import (DatasetError, DatasetSource, FileSampleLoader, Record, check_files_exist,
                                          read_id_list)
from u2pl_scale.data.shard_format import IGNORE_INDEX, SPLITS

COCO_NUM_CLASSES = 81  # background + the 80 categories of COCO 2017


def decode_coco_rle(counts: Union[str, bytes, Sequence[int]], height: int, width: int) -> np.ndarray:
    """Binary HxW mask from COCO RLE: counts as a list (uncompressed) or the compressed string of pycocotools.
    Runs alternate 0/1 starting with 0, in column-major order."""
    if isinstance(counts, (str, bytes)):
        counts = _rle_string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
    runs = np.asarray(counts, dtype=np.int64)
    if runs.sum() != height * width or (runs < 0).any():
        raise DatasetError(f"RLE runs sum to {runs.sum()}, expected {height}x{width}={height * width}")
    values = np.arange(len(runs)) % 2
    return np.repeat(values.astype(bool), runs).reshape(width, height).T


def _rle_string_to_counts(text: str) -> list[int]:
    """pycocotools' compressed RLE: 5 bits per char (offset 48, bit 0x20 = more), runs after the second are
    stored as differences to the run two places back."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            char = ord(text[position]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)  # sign extension
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rasterize_polygon(xy: Sequence[float], height: int, width: int) -> np.ndarray:
    """Fill a polygon [x0, y0, x1, y1, ...] (even-odd rule): a pixel is inside when its centre is.

    Pixel (row r, column c) spans [c, c+1) x [r, r+1), as in COCO, so the square with corners (2, 2) and (6, 6)
    covers columns and rows 2..5 (16 pixels, its area), like pycocotools. PIL's ImageDraw.polygon also fills
    the boundary pixels (25 here), which inflates every object by a pixel on two sides.
    """
    points = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros((height, width), dtype=bool)
    if len(points) < 3:
        return mask
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    first_row = max(0, int(np.floor(y0.min() - 0.5)))
    last_row = min(height - 1, int(np.ceil(y0.max() - 0.5)))
    if last_row < first_row:
        return mask
    centre_y = np.arange(first_row, last_row + 1, dtype=np.float64)[:, None] + 0.5
    crossing = (y0 <= centre_y) != (y1 <= centre_y)  # rows x edges; half-open, so a vertex counts once
    rows, edges = np.nonzero(crossing)
    crossing_x = x0[edges] + (centre_y[rows, 0] - y0[edges]) * (x1[edges] - x0[edges]) / (y1[edges] - y0[edges])
    # Pixel c is inside when an odd number of crossings lie at x <= c + 0.5, i.e. at columns ceil(x - 0.5) <= c:
    # mark each crossing at that column and take the running parity along the row.
    columns = np.clip(np.ceil(crossing_x - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((last_row - first_row + 1, width + 1), dtype=np.int32)
    np.add.at(toggles, (rows, columns), 1)
    mask[first_row:last_row + 1] = np.cumsum(toggles[:, :width], axis=1) % 2 == 1
    return mask


def _annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):  # polygons: union of parts
        mask = np.zeros((height, width), dtype=bool)
        for polygon in segmentation:
            mask |= rasterize_polygon(polygon, height, width)
        return mask
    rle_height, rle_width = segmentation["size"]
    if (rle_height, rle_width) != (height, width):
        raise DatasetError(f"RLE size {segmentation['size']} differs from the image size {[height, width]}")
    return decode_coco_rle(segmentation["counts"], height, width)


def read_coco_semantic_mask(annotation_info: tuple[str, int, int, tuple]) -> np.ndarray:
    """Semantic mask from (image file, height, width, ((class id, iscrowd, area, segmentation), ...)).

    Larger objects are drawn first so smaller ones on top stay visible; crowd regions become 255 where no
    single object covers them."""
    image_file, height, width, annotations = annotation_info
    mask = np.zeros((height, width), dtype=np.uint8)
    crowd = np.zeros((height, width), dtype=bool)
    try:
        for class_id, iscrowd, _, segmentation in sorted(annotations, key=lambda a: -a[2]):
            region = _annotation_mask(segmentation, height, width)
            if iscrowd:
                crowd |= region
            else:
                mask[region] = class_id
    except (DatasetError, KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{image_file}: bad annotation: {error}") from error
    mask[crowd & (mask == 0)] = IGNORE_INDEX
    return mask


def _load_coco_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path} not found: --root must hold annotations/instances_{{train,val}}2017.json")
    with open(path) as file:
        return json.load(file)


def coco_source(root: Union[str, Path], split_file: Optional[Union[str, Path]] = None,
                unlabeled_dir: Optional[str] = None, splits: Sequence[str] = SPLITS) -> DatasetSource:
    """COCO 2017 instances as 81-class semantic masks (0 background, category ids -> 1..80 in sorted id order).

    labeled = the train2017 images named in split_file (all of train2017 without one); unlabeled = the rest of
    train2017 plus every image of unlabeled_dir (a path, or relative to root: unlabeled2017); val = val2017."""
    root = Path(root)
    # Load only the annotation files the requested splits need: the train file alone is about 450 MB.
    instances = {subset: _load_coco_json(root / "annotations" / f"instances_{subset}2017.json")
                 for subset in ("train", "val")
                 if (subset == "val" and "val" in splits)
                 or (subset == "train" and ("labeled" in splits or ("unlabeled" in splits and split_file)))}
    category_lists = {subset: sorted((c["id"], c["name"]) for c in data["categories"])
                      for subset, data in instances.items()}
    if len({tuple(c) for c in category_lists.values()}) > 1:
        raise DatasetError("instances_train2017.json and instances_val2017.json list different categories")
    categories = next(iter(category_lists.values()), None)
    if categories is None:  # unlabeled images only: the class list comes from no file
        class_names, class_of = None, {}
    else:
        class_names = ["background"] + [name for _, name in categories]
        class_of = {category_id: index + 1 for index, (category_id, _) in enumerate(categories)}
    num_classes = len(class_names) if class_names else COCO_NUM_CLASSES
    source = DatasetSource("coco", num_classes, class_names, FileSampleLoader(num_classes, read_coco_semantic_mask))

    def labeled_records(subset: str, wanted: Optional[list[str]]) -> list[Record]:
        data = instances[subset]
        annotations: dict[int, list] = {}
        for annotation in data["annotations"]:
            annotations.setdefault(annotation["image_id"], []).append(
                (class_of[annotation["category_id"]], int(annotation.get("iscrowd", 0)),
                 float(annotation.get("area", 0.0)), annotation["segmentation"]))
        by_name = {}
        for image in data["images"]:
            by_name[Path(image["file_name"]).stem] = image
            by_name[str(image["id"])] = image  # split files may list numeric image ids
        if wanted is not None:
            unknown = [name for name in wanted if name not in by_name]
            if unknown:
                raise DatasetError(f"{len(unknown)} ids of {split_file} are not in {subset}2017, e.g. {unknown[:5]}")
        chosen = [by_name[name] for name in wanted] if wanted is not None else data["images"]
        records = []
        for image in chosen:
            path = root / f"{subset}2017" / image["file_name"]
            info = (str(path), image["height"], image["width"], tuple(annotations.get(image["id"], ())))
            records.append((Path(image["file_name"]).stem, (str(path), info)))
        check_files_exist([Path(payload[0]) for _, payload in records], f"images in {root / f'{subset}2017'}")
        return records

    wanted = read_id_list(split_file) if split_file is not None else None
    if "labeled" in splits:
        source.splits["labeled"] = labeled_records("train", wanted)
    if "unlabeled" in splits:
        unlabeled: list[Record] = []
        if wanted is not None:
            wanted_names = set(wanted)
            labeled_stems = {Path(image["file_name"]).stem for image in instances["train"]["images"]
                             if Path(image["file_name"]).stem in wanted_names or str(image["id"]) in wanted_names}
            unlabeled += [(p.stem, (str(p), None)) for p in sorted((root / "train2017").glob("*.jpg"))
                          if p.stem not in labeled_stems]
        if unlabeled_dir is not None:
            # Accept the folder as given (coco/unlabeled2017) or relative to the root (unlabeled2017).
            folder = Path(unlabeled_dir) if Path(unlabeled_dir).is_dir() else root / unlabeled_dir
            if not folder.is_dir():
                raise DatasetError(f"--unlabeled-dir: neither {unlabeled_dir} nor {folder} is a directory")
            unlabeled += [(p.stem, (str(p), None)) for p in sorted(folder.glob("*.jpg"))]
        source.splits["unlabeled"] = unlabeled
    if "val" in splits:
        source.splits["val"] = labeled_records("val", None)
    return source
