"""Source readers for real datasets: Pascal VOC 2012 (+SBD aug), Cityscapes, COCO 2017 and plain folders.

Each reader turns a dataset on disk into a DatasetSource: per split, a sorted list of (key, payload) records,
plus one picklable loader that turns a record into a validated EncodedSample in an encoding process.
build_dataset writes the requested splits as shard sets (see writer.py). Label conversion happens here, so
every shard holds train ids in [0, num_classes) or 255 = ignore.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from u2pl_scale.data.writer import IGNORE_INDEX, SPLITS, EncodedSample, ShardWriteError, encode_sample, write_split

VOC_CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor"]
CITYSCAPES_CLASS_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                          "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                          "motorcycle", "bicycle"]
# Official cityscapesScripts mapping from label id to train id; every other label id is ignored.
CITYSCAPES_LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                                25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
COCO_NUM_CLASSES = 81  # background + the 80 categories of COCO 2017
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


class DatasetError(ValueError):
    """The dataset on disk or a build option is wrong; the message names the file or option."""


Record = tuple[str, tuple[str, Any]]  # (key, (image path, mask source or None))


@dataclass
class DatasetSource:
    """What a reader found: records per split (only the splits asked for) and how to load them."""

    name: str
    num_classes: int
    class_names: Optional[list[str]]
    loader: Callable[[str, Any], EncodedSample]
    splits: dict[str, list[Record]] = field(default_factory=dict)


def read_id_list(path: Union[str, Path], strip_suffixes: Sequence[str] = (), strip_extension: bool = True
                 ) -> list[str]:
    """Ids from a split file. A line is an id, a file name or "image_path mask_path"; the id is the first
    token's base name without extension (or without the first of strip_suffixes it ends with).
    Blank and # lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist")
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
        for suffix in strip_suffixes:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            if strip_extension and "." in name:
                name = name.rsplit(".", 1)[0]
        ids.append(name)
    duplicates = sorted(name for name, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise DatasetError(f"split file {path} lists ids more than once: {duplicates[:10]}")
    return ids


def read_index_mask(path: Union[str, Path]) -> np.ndarray:
    """Class-index mask from a PNG/BMP/TIFF: palette images give palette indices (VOC), gray images their values.
    Colour RGB masks are refused unless all channels are equal, because their colours would need a palette."""
    try:
        with Image.open(path) as image:
            image.load()
            mask = np.array(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ShardWriteError(f"mask {path}: cannot decode: {error}") from error
    if mask.ndim == 3:
        if mask.shape[2] in (3, 4) and (mask[..., :3] == mask[..., :1]).all():
            return mask[..., 0]
        raise DatasetError(f"mask {path} is a colour image ({mask.shape[2]} channels): save masks as single-channel "
                           "class-index PNGs (palette or gray), one value per class")
    if mask.dtype == bool:
        raise DatasetError(f"mask {path} is a 1-bit image: its values are 0/1 booleans; save it as 8-bit class ids")
    return mask


def _check_files_exist(paths: Iterable[Path], what: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} {what} missing, e.g. {missing[:5]}")


def _check_disjoint(first: Iterable[str], second: Iterable[str], what: str) -> None:
    overlap = sorted(set(first) & set(second))
    if overlap:
        raise DatasetError(f"{what}: {len(overlap)} ids are in both, e.g. {overlap[:5]}")


@dataclass(frozen=True)
class FileSampleLoader:
    """Loader for write_split: payload = (image path, mask source or None); read_mask turns the source into
    a mask of train ids. Image files are stored as they are when they are RGB JPEG/PNG."""

    num_classes: int
    read_mask: Callable[[Any], np.ndarray] = read_index_mask

    def __call__(self, key: str, payload: tuple[str, Any]) -> EncodedSample:
        image_path, mask_source = payload
        try:
            image_bytes = Path(image_path).read_bytes()
        except OSError as error:
            raise ShardWriteError(f"sample {key!r}: cannot read image {image_path}: {error}") from error
        mask = None if mask_source is None else self.read_mask(mask_source)
        return encode_sample(key, image_bytes, mask, num_classes=self.num_classes, source=str(image_path))


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
        _check_disjoint(labeled_ids, val_ids, f"labeled split {split_file} and {sets / 'val.txt'}")
    source = DatasetSource("voc", len(VOC_CLASS_NAMES), VOC_CLASS_NAMES, FileSampleLoader(len(VOC_CLASS_NAMES)))
    if "labeled" in splits:
        mask_paths = [aug / f"{i}.png" if (aug / f"{i}.png").is_file() else fine / f"{i}.png" for i in labeled_ids]
        _check_files_exist(mask_paths, f"labeled masks (looked in {aug} and {fine})")
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
        _check_files_exist([fine / f"{i}.png" for i in val_ids], f"val masks in {fine}")
        source.splits["val"] = [(i, (str(images / f"{i}.jpg"), str(fine / f"{i}.png"))) for i in val_ids]
    for records in source.splits.values():
        _check_files_exist([Path(payload[0]) for _, payload in records], f"images in {images}")
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
        _check_files_exist([mask_of(subset, i) for i in ids], f"gtFine/{subset} label id masks")
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


# ---------------------------------------------------------------- COCO 2017


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
        _check_files_exist([Path(payload[0]) for _, payload in records], f"images in {root / f'{subset}2017'}")
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
        key = _UNSAFE_KEY_CHARS.sub("_", stem)
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
    image_files = _index_files(Path(images), IMAGE_EXTENSIONS, "images")
    lists = {"labeled": labeled_list, "unlabeled": unlabeled_list, "val": val_list}
    # Folder stems may hold dots ("img.001"), so a list entry is a stem, or a file name whose stem is one.
    def stem_of(entry: str) -> str:
        return entry if entry in image_files or "." not in entry else entry.rsplit(".", 1)[0]

    ids = {split: [stem_of(entry) for entry in read_id_list(lists[split], strip_extension=False)]
           for split in splits if lists[split] is not None}
    for first, second in (("labeled", "val"), ("labeled", "unlabeled"), ("unlabeled", "val")):
        if first in ids and second in ids:
            _check_disjoint(ids[first], ids[second], f"{first} list and {second} list")
    if {"labeled", "val"} & set(ids):
        if masks is None:
            raise DatasetError("--masks is needed for the labeled and val lists")
        mask_files = _index_files(Path(masks), MASK_EXTENSIONS, "masks")
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
        files = _index_files(Path(unlabeled_dir), IMAGE_EXTENSIONS, "unlabeled images")
        keys = _safe_keys(files)
        source.splits["unlabeled"] = [(keys[s], (str(p), None)) for s, p in files.items()]
    if not source.splits:
        raise DatasetError("nothing to build: pass --labeled-list, --unlabeled-list/--unlabeled-dir or --val-list")
    return source


# ---------------------------------------------------------------- writing


def build_dataset(source: DatasetSource, out_root: Union[str, Path], workers: int = 1,
                  max_count: Optional[int] = None, max_bytes: Optional[Union[int, str]] = None,
                  progress: bool = True) -> dict[str, dict]:
    """Write every split of source to out_root/{split}/ and return the manifests by split."""
    empty = [split for split, records in source.splits.items() if not records]
    if empty:
        raise DatasetError(f"{source.name}: no images for split(s) {empty}; check the split file and options, "
                           "or leave the split out with --splits")
    manifests = {}
    for split, records in source.splits.items():
        manifests[split] = write_split(Path(out_root) / split, split, source.name, records, source.loader,
                                       source.num_classes, source.class_names, workers=workers,
                                       max_count=max_count, max_bytes=max_bytes, progress=progress)
    return manifests
