"""What every dataset reader shares: a DatasetSource (records per split plus a picklable loader), split files,
class-index masks, input checks, and build_dataset, which writes a source's splits as shard sets (writer.py).

The readers themselves are in u2pl_scale.data.datasets (VOC, Cityscapes, plain folders) and
u2pl_scale.data.dataset_coco (COCO 2017).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from u2pl_scale.data.writer import EncodedSample, ShardWriteError, encode_sample, write_split


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


def check_files_exist(paths: Iterable[Path], what: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} {what} missing, e.g. {missing[:5]}")


def check_disjoint(first: Iterable[str], second: Iterable[str], what: str) -> None:
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
