"""Source readers for real datasets: Pascal VOC 2012 (+SBD aug), Cityscapes, COCO 2017 and plain folders.

Each reader turns a dataset on disk into a DatasetSource: per split, a sorted list of (key, payload) records,
plus one picklable loader that turns a record into a validated EncodedSample in an encoding process.
build_dataset writes the requested splits as shard sets (see writer.py). Label conversion happens here, so
every shard holds train ids in [0, num_classes) or 255 = ignore. What the readers share is in dataset_base, the
COCO reader in dataset_coco; both are re-exported here, the one module callers import.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

# The shared parts and the COCO reader are re-exported: callers use this module for every reader.
from u2pl_scale.data.dataset_base import (DatasetError, DatasetSource, FileSampleLoader, Record,  # noqa: F401
                                          build_dataset, check_disjoint, check_files_exist, read_id_list,
                                          read_index_mask)
from u2pl_scale.data.dataset_coco import (COCO_NUM_CLASSES, coco_source, decode_coco_rle,  # noqa: F401
                                          rasterize_polygon, read_coco_semantic_mask)
from u2pl_scale.data.shard_format import IGNORE_INDEX, SPLITS, safe_key

VOC_CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor"]
CITYSCAPES_CLASS_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                          "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                          "motorcycle", "bicycle"]
# Official cityscapesScripts mapping from label id to train id; every other label id is ignored.
CITYSCAPES_LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                                25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# Input files the folder reader picks up; the writer converts them (shard members: shard_format.IMAGE_EXTENSIONS).
SOURCE_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SOURCE_MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


# ---------------------------------------------------------------- Pascal VOC 2012


def voc_source(root: Union[str, Path], split_file: Optional[Union[str, Path]], aug_dir: str = "SegmentationClassAug",
               splits: Sequence[str] = SPLITS) -> DatasetSource:
    """VOC 2012: labeled = ids of split_file with SegmentationClassAug masks (falling back to SegmentationClass);
    unlabeled = ImageSets/Segmentation/train_aug.txt (or every id with an aug mask) minus labeled and val;
    val = ImageSets/Segmentation/val.txt with SegmentationClass palette masks (palette index = class id)."""
    root = Path(root)
    images, aug, fine = root / "JPEGImages", root / aug_dir, root / "SegmentationClass"
    sets = root / "ImageSets" / "Segmentation"
    if not images.is_dir():
        raise DatasetError(f"{images} not found: --root must be VOCdevkit/VOC2012")
    val_ids = read_id_list(sets / "val.txt") if {"val", "unlabeled"} & set(splits) else []
    labeled_ids = []
    if {"labeled", "unlabeled"} & set(splits):
        if split_file is None:
            raise DatasetError("VOC needs --split-file: the ids of the labeled images")
        labeled_ids = read_id_list(split_file)
        check_disjoint(labeled_ids, val_ids, f"labeled split {split_file} and {sets / 'val.txt'}")
    source = DatasetSource("voc", len(VOC_CLASS_NAMES), VOC_CLASS_NAMES, FileSampleLoader(len(VOC_CLASS_NAMES)))
    if "labeled" in splits:
        mask_paths = [aug / f"{i}.png" if (aug / f"{i}.png").is_file() else fine / f"{i}.png" for i in labeled_ids]
        check_files_exist(mask_paths, f"labeled masks (looked in {aug} and {fine})")
        source.splits["labeled"] = [(i, (str(images / f"{i}.jpg"), str(m))) for i, m in zip(labeled_ids, mask_paths)]
    if "unlabeled" in splits:
        train_aug = sets / "train_aug.txt"
        if train_aug.is_file():
            train_ids = read_id_list(train_aug)
        elif aug.is_dir():
            train_ids = sorted(p.stem for p in aug.glob("*.png"))
        else:
            raise DatasetError(f"neither {train_aug} nor {aug} exists: cannot tell which images are unlabeled")
        # val images must never reach training, even when the aug directory holds their masks
        excluded = set(labeled_ids) | set(val_ids)
        source.splits["unlabeled"] = [(i, (str(images / f"{i}.jpg"), None)) for i in train_ids if i not in excluded]
    if "val" in splits:
        check_files_exist([fine / f"{i}.png" for i in val_ids], f"val masks in {fine}")
        source.splits["val"] = [(i, (str(images / f"{i}.jpg"), str(fine / f"{i}.png"))) for i in val_ids]
    for records in source.splits.values():
        check_files_exist([Path(payload[0]) for _, payload in records], f"images in {images}")
    return source


# ---------------------------------------------------------------- Cityscapes

_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
    _CITYSCAPES_LUT[_label_id] = _train_id


def read_cityscapes_train_ids(path: Union[str, Path]) -> np.ndarray:
    """A gtFine *_labelIds.png converted to the 19 train ids (everything else 255)."""
    label_ids = read_index_mask(path)
    if label_ids.dtype != np.uint8:
        raise DatasetError(f"mask {path}: expected 8-bit label ids, got {label_ids.dtype}")
    return _CITYSCAPES_LUT[label_ids]


def cityscapes_source(root: Union[str, Path], split_file: Optional[Union[str, Path]],
                      splits: Sequence[str] = SPLITS) -> DatasetSource:
    """Cityscapes fine: labeled = ids of split_file (all train images without one), unlabeled = the other
    train images, val = leftImg8bit/val; masks are gtFine *_gtFine_labelIds.png mapped to train ids."""
    root = Path(root)
    source = DatasetSource("cityscapes", len(CITYSCAPES_CLASS_NAMES), CITYSCAPES_CLASS_NAMES,
                           FileSampleLoader(len(CITYSCAPES_CLASS_NAMES), read_cityscapes_train_ids))

    def images_of(subset: str) -> dict[str, Path]:
        folder = root / "leftImg8bit" / subset
        found = {p.name[: -len("_leftImg8bit.png")]: p for p in sorted(folder.glob("*/*_leftImg8bit.png"))}
        if not found:
            raise DatasetError(f"no */*_leftImg8bit.png under {folder}: --root must hold leftImg8bit/ and gtFine/")
        return found

    def mask_of(subset: str, image_id: str) -> Path:
        return root / "gtFine" / subset / image_id.split("_")[0] / f"{image_id}_gtFine_labelIds.png"

    def labeled_records(subset: str, ids: Sequence[str], images: dict[str, Path]) -> list[Record]:
        check_files_exist([mask_of(subset, i) for i in ids], f"gtFine/{subset} label id masks")
        return [(i, (str(images[i]), str(mask_of(subset, i)))) for i in ids]

    if {"labeled", "unlabeled"} & set(splits):
        train = images_of("train")
        labeled_ids = sorted(train) if split_file is None else read_id_list(
            split_file, strip_suffixes=("_leftImg8bit.png", "_gtFine_labelIds.png"))
        unknown = [i for i in labeled_ids if i not in train]
        if unknown:
            raise DatasetError(f"{len(unknown)} ids of {split_file} are not in leftImg8bit/train, e.g. {unknown[:5]}")
        if "labeled" in splits:
            source.splits["labeled"] = labeled_records("train", labeled_ids, train)
        if "unlabeled" in splits:
            labeled = set(labeled_ids)
            source.splits["unlabeled"] = [(i, (str(p), None)) for i, p in train.items() if i not in labeled]
    if "val" in splits:
        val = images_of("val")
        source.splits["val"] = labeled_records("val", sorted(val), val)
    return source


# ---------------------------------------------------------------- plain folders


def read_label_map(path: Union[str, Path]) -> dict[int, int]:
    """Label map from JSON ({"src": dst, ...}) or text lines "src dst" (# comments allowed)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"label map {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            pairs = [(int(src), int(dst)) for src, dst in json.loads(text).items()]
        else:
            pairs = [tuple(int(v) for v in line.split()) for line in text.splitlines()
                     if line.strip() and not line.strip().startswith("#")]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("every line must be 'source_value target_value'")
    except (ValueError, AttributeError) as error:
        raise DatasetError(f"label map {path}: {error}") from error
    return dict(pairs)


@dataclass(frozen=True)
class FolderMaskReader:
    """Raw mask -> train ids: pixels equal to ignore_index become 255, then label_map applies (unmapped values
    stay). A raw 255 that neither option explains is an error, so 0/255 binary masks never pass silently."""

    ignore_index: Optional[int] = None
    label_map: tuple[tuple[int, int], ...] = ()

    def __call__(self, path: str) -> np.ndarray:
        raw = read_index_mask(path).astype(np.int64)
        mapped_sources = {src for src, _ in self.label_map}
        if self.ignore_index != IGNORE_INDEX and IGNORE_INDEX not in mapped_sources and (raw == IGNORE_INDEX).any():
            values = np.unique(raw).tolist()
            kind = "looks like a binary mask stored as 0/255; " if set(values) <= {0, IGNORE_INDEX} else ""
            raise DatasetError(
                f"mask {path} holds value 255 (values {values[:10]}): {kind}say what 255 means: "
                "--label-map with a line '255 1' makes it class 1, --ignore-index 255 makes it ignored")
        converted = raw.copy()
        for src, dst in self.label_map:
            converted[raw == src] = dst
        if self.ignore_index is not None:
            converted[raw == self.ignore_index] = IGNORE_INDEX
        return converted


def _index_files(folder: Path, extensions: Sequence[str], what: str) -> dict[str, Path]:
    """stem -> file for a flat folder; a stem used by two files is an error."""
    if not folder.is_dir():
        raise DatasetError(f"{what} directory {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in extensions and path.is_file():
            if path.stem in found:
                raise DatasetError(f"{what}: {found[path.stem].name} and {path.name} share the stem {path.stem!r}")
            found[path.stem] = path
    return found


def _safe_keys(stems: Iterable[str]) -> dict[str, str]:
    """stem -> shard key: characters a WebDataset key cannot hold (dots, spaces) become '_'."""
    keys: dict[str, str] = {}
    stem_of_key: dict[str, str] = {}
    for stem in stems:
        key = safe_key(stem)
        if key in stem_of_key and stem_of_key[key] != stem:
            raise DatasetError(f"file stems {stem_of_key[key]!r} and {stem!r} both become shard key {key!r}")
        keys[stem], stem_of_key[key] = key, stem
    return keys


def folder_source(images: Union[str, Path], masks: Optional[Union[str, Path]], num_classes: int,
                  labeled_list: Optional[Union[str, Path]] = None, unlabeled_list: Optional[Union[str, Path]] = None,
                  unlabeled_dir: Optional[Union[str, Path]] = None, val_list: Optional[Union[str, Path]] = None,
                  ignore_index: Optional[int] = None, label_map: Optional[dict[int, int]] = None,
                  class_names: Optional[list[str]] = None, name: str = "folder",
                  splits: Sequence[str] = SPLITS) -> DatasetSource:
    """A folder of images and a folder of class-index masks matched by file stem. Lists name the stems of each
    split; unlabeled images come from unlabeled_list (stems in `images`) or every image in unlabeled_dir.
    A split without its list is not built."""
    if not 1 <= num_classes <= 255:
        raise DatasetError(f"--num-classes must be in 1..255, got {num_classes}")
    label_map = dict(label_map or {})
    if ignore_index is not None and ignore_index in label_map:
        raise DatasetError(f"value {ignore_index} is both --ignore-index and a --label-map source")
    bad_targets = {src: dst for src, dst in label_map.items() if not (0 <= dst < num_classes or dst == IGNORE_INDEX)}
    if bad_targets:
        raise DatasetError(f"--label-map targets must be < {num_classes} or 255, got {bad_targets}")
    if unlabeled_list is not None and unlabeled_dir is not None:
        raise DatasetError("pass either --unlabeled-list or --unlabeled-dir, not both")
    if class_names is not None and len(class_names) != num_classes:
        raise DatasetError(f"{len(class_names)} class names given for --num-classes {num_classes}")
    reader = FolderMaskReader(ignore_index, tuple(sorted(label_map.items())))
    source = DatasetSource(name, num_classes, class_names, FileSampleLoader(num_classes, reader))
    image_files = _index_files(Path(images), SOURCE_IMAGE_EXTENSIONS, "images")
    lists = {"labeled": labeled_list, "unlabeled": unlabeled_list, "val": val_list}
    # Folder stems may hold dots ("img.001"), so a list entry is a stem, or a file name whose stem is one.
    def stem_of(entry: str) -> str:
        return entry if entry in image_files or "." not in entry else entry.rsplit(".", 1)[0]

    ids = {split: [stem_of(entry) for entry in read_id_list(lists[split], strip_extension=False)]
           for split in splits if lists[split] is not None}
    for first, second in (("labeled", "val"), ("labeled", "unlabeled"), ("unlabeled", "val")):
        if first in ids and second in ids:
            check_disjoint(ids[first], ids[second], f"{first} list and {second} list")
    if {"labeled", "val"} & set(ids):
        if masks is None:
            raise DatasetError("--masks is needed for the labeled and val lists")
        mask_files = _index_files(Path(masks), SOURCE_MASK_EXTENSIONS, "masks")
    for split, stems in ids.items():
        missing = [s for s in stems if s not in image_files]
        if missing:
            raise DatasetError(f"{split} list {lists[split]}: {len(missing)} stems have no image in {images}, "
                               f"e.g. {missing[:5]}")
        keys = _safe_keys(stems)
        if split == "unlabeled":
            source.splits[split] = [(keys[s], (str(image_files[s]), None)) for s in stems]
            continue
        missing = [s for s in stems if s not in mask_files]
        if missing:
            raise DatasetError(f"{split} list {lists[split]}: {len(missing)} stems have no mask in {masks}, "
                               f"e.g. {missing[:5]}")
        source.splits[split] = [(keys[s], (str(image_files[s]), str(mask_files[s]))) for s in stems]
    if unlabeled_dir is not None and "unlabeled" in splits:
        files = _index_files(Path(unlabeled_dir), SOURCE_IMAGE_EXTENSIONS, "unlabeled images")
        keys = _safe_keys(files)
        source.splits["unlabeled"] = [(keys[s], (str(p), None)) for s, p in files.items()]
    if not source.splits:
        raise DatasetError("nothing to build: pass --labeled-list, --unlabeled-list/--unlabeled-dir or --val-list")
    return source
