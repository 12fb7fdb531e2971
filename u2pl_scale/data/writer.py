"""Shard writing: validated samples -> size-bounded, deterministic WebDataset tar shards + manifest.json.

The on-disk format ("u2pl-shards/1") is defined in u2pl_scale.data.shard_format, which the reader
(u2pl_scale.data.stream / decode) and the inspector (u2pl_scale.data.inspect_shards) use too. The writer stores
each image as `{key}.jpg|png` (RGB) and, for labeled/val sets, `{key}.seg.png` (8-bit single-channel mask, values
< num_classes or 255 = ignore); unlabeled samples carry no mask at all.

Determinism: members are written in sorted key order with fixed tar metadata (mtime 0, uid/gid 0, no user
names), so the same input gives byte-identical shards whatever the number of encoding workers.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import multiprocessing
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from u2pl_scale.atomic import write_json_atomic
from u2pl_scale.data.shard_format import (FORMAT, IGNORE_INDEX, IMAGE_EXTENSIONS, IMAGE_FORMATS, IMAGE_MODE,
                                          MANIFEST_NAME, MASK_EXTENSION, SHARD_NAME_GLOB, SPLITS,
                                          WRITTEN_IMAGE_EXTENSIONS, is_valid_key, member_name, shard_name)

TAR_BLOCK = 512
DEFAULT_MAX_BYTES = 256 * 1000**2  # small enough that a multi-node run gets several shards per rank

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
# PIL format -> extension, for the image files stored byte for byte
_WRITTEN_EXTENSION = {IMAGE_FORMATS[ext]: ext for ext in WRITTEN_IMAGE_EXTENSIONS}


class ShardWriteError(ValueError):
    """A sample or setting cannot be written; the message names the key/file and what is wrong."""


def parse_size(text: Union[str, int]) -> int:
    """Parse a byte size such as "500MB", "1GB", "64MiB" or "1000000" into bytes (KB/MB/GB are powers of 1000)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"cannot parse size {text!r}: use a number with an optional unit, e.g. 500MB, 1GB, 64MiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class EncodedSample:
    """One sample ready for a tar shard: encoded image, optional encoded mask and its class pixel counts."""

    key: str
    image: bytes
    image_ext: str  # one of shard_format.WRITTEN_IMAGE_EXTENSIONS ("jpg" or "png")
    height: int
    width: int
    mask: Optional[bytes] = None
    class_histogram: Optional[np.ndarray] = None  # pixels per class id, ignore excluded

    def without_mask(self) -> "EncodedSample":
        """The same image as an unlabeled sample (no mask member is written)."""
        return EncodedSample(self.key, self.image, self.image_ext, self.height, self.width)


def _describe(key: str, source: Optional[str]) -> str:
    return f"sample {key!r}" + (f" ({source})" if source else "")


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_image(key: str, image: Union[np.ndarray, bytes], source: Optional[str]) -> tuple[bytes, str, int, int]:
    """Return (bytes, ext, height, width). Encoded JPEG/PNG RGB files pass through unchanged (no re-encoding loss)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ShardWriteError(f"{_describe(key, source)}: image array must be uint8 HxWx3, "
                                  f"got {image.dtype} {image.shape}")
        return _encode_png(image), "png", image.shape[0], image.shape[1]
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            decoded.load()  # full decode: a truncated or corrupt file fails here, not in training
            file_format, mode, (width, height) = decoded.format, decoded.mode, decoded.size
            if file_format in _WRITTEN_EXTENSION and mode == IMAGE_MODE:
                return image, _WRITTEN_EXTENSION[file_format], height, width
            # Grayscale, CMYK, palette or other formats: store as RGB so every reader sees 3 channels.
            rgb = decoded.convert(IMAGE_MODE)
    except (OSError, SyntaxError, ValueError) as error:
        raise ShardWriteError(f"{_describe(key, source)}: cannot decode image: {error}") from error
    buffer = io.BytesIO()
    if file_format == "JPEG":
        rgb.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue(), "jpg", height, width
    rgb.save(buffer, format="PNG")
    return buffer.getvalue(), "png", height, width


def encode_sample(key: str, image: Union[np.ndarray, bytes], mask: Optional[np.ndarray] = None, *,
                  num_classes: Optional[int] = None, source: Optional[str] = None) -> EncodedSample:
    """Validate and encode one sample.

    image: uint8 HxWx3 array, or the bytes of an image file (JPEG/PNG RGB files are kept as they are).
    mask: HxW integer array of class ids (< num_classes) or 255 = ignore; None for unlabeled samples.
    source: a file name for error messages.
    """
    if not is_valid_key(key):
        raise ShardWriteError(f"{_describe(key, source)}: key must use only letters, digits, '_', '-' "
                              "(a '.' would split the WebDataset key)")
    image_bytes, ext, height, width = _encode_image(key, image, source)
    if mask is None:
        return EncodedSample(key, image_bytes, ext, height, width)
    if num_classes is None:
        raise ShardWriteError(f"{_describe(key, source)}: num_classes is needed to validate a mask")
    if mask.ndim != 2 or mask.shape != (height, width):
        raise ShardWriteError(f"{_describe(key, source)}: mask shape {tuple(mask.shape)} does not match "
                              f"image shape {(height, width)}")
    if mask.dtype.kind not in "iu":
        raise ShardWriteError(f"{_describe(key, source)}: mask must hold integers, got {mask.dtype}")
    bad = (mask < 0) | ((mask >= num_classes) & (mask != IGNORE_INDEX))
    if bad.any():
        bad_values = np.unique(mask[bad]).tolist()
        raise ShardWriteError(f"{_describe(key, source)}: mask has {int(bad.sum())} pixels with labels "
                              f"{bad_values[:20]} outside [0, {num_classes}) and not {IGNORE_INDEX} (ignore)")
    mask = mask.astype(np.uint8, copy=False)
    counts = np.bincount(mask.ravel(), minlength=256)[:num_classes].astype(np.int64)
    return EncodedSample(key, image_bytes, ext, height, width, _encode_png(mask), counts)


class _HashingFile:
    """Write-only file wrapper that hashes what goes through it, so a shard's checksum needs no second read."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self._position = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._position += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._position

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _tar_member_bytes(data_size: int) -> int:
    return TAR_BLOCK + -(-data_size // TAR_BLOCK) * TAR_BLOCK


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardSetWriter:
    """Write one split (labeled / unlabeled / val) of a dataset as size-bounded tar shards plus manifest.json.

    A new shard starts when the current one would pass max_bytes or holds max_count samples. Every shard is
    written under a temporary name and renamed when complete; manifest.json is written last, so a directory
    without a manifest is an unfinished set. Use as a context manager, or call close().
    """

    def __init__(self, out_dir: Union[str, Path], split: str, dataset: str, num_classes: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None, max_count: Optional[int] = None,
                 max_bytes: Optional[Union[int, str]] = None):
        if split not in SPLITS:
            raise ShardWriteError(f"split must be one of {SPLITS}, got {split!r}")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ShardWriteError(f"{len(class_names)} class names given for num_classes={num_classes}")
        if split != "unlabeled" and num_classes is None:
            raise ShardWriteError(f"split {split!r} has masks and needs num_classes")
        if max_count is not None and max_count <= 0:
            raise ShardWriteError(f"max_count must be positive, got {max_count}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dataset = dataset
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.has_masks = split != "unlabeled"
        self.max_count = max_count
        self.max_bytes = parse_size(max_bytes) if max_bytes is not None else (
            None if max_count is not None else DEFAULT_MAX_BYTES)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # An old manifest would describe shards that are about to be overwritten.
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self._shards: list[dict] = []
        self._keys: set[str] = set()
        self._histogram = np.zeros(num_classes or 0, dtype=np.int64)
        self._min_size: Optional[list[int]] = None
        self._max_size: Optional[list[int]] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._file: Optional[_HashingFile] = None
        self._shard_count = 0
        self.manifest: Optional[dict] = None

    @property
    def num_samples(self) -> int:
        return len(self._keys)

    def _shard_name(self, index: int) -> str:
        return shard_name(self.split, index)

    def _open_shard(self) -> None:
        name = self._shard_name(len(self._shards))
        self._file = _HashingFile(self.out_dir / (name + ".tmp"))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._shard_count = 0

    def _close_shard(self) -> None:
        name = self._shard_name(len(self._shards))
        self._tar.close()
        self._file.close()
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self._shards.append({"name": name, "num_samples": self._shard_count, "sha256": self._file.hexdigest(),
                             "size": self._file.tell()})
        self._tar = self._file = None

    def write(self, sample: EncodedSample) -> None:
        """Append one encoded sample (see encode_sample). Unlabeled sets refuse masks; labeled sets need them."""
        if self.manifest is not None:
            raise ShardWriteError(f"{self.out_dir}: writer is already closed")
        if sample.key in self._keys:
            raise ShardWriteError(f"sample {sample.key!r}: duplicate key in split {self.split!r}")
        if self.has_masks != (sample.mask is not None):
            raise ShardWriteError(f"sample {sample.key!r}: split {self.split!r} "
                                  + ("needs a mask" if self.has_masks else "must not contain masks"))
        if self.has_masks and len(sample.class_histogram) != self.num_classes:
            raise ShardWriteError(f"sample {sample.key!r}: encoded for {len(sample.class_histogram)} classes, "
                                  f"split has {self.num_classes}")
        if sample.image_ext not in IMAGE_EXTENSIONS:  # the reader would find no image in the sample
            raise ShardWriteError(f"sample {sample.key!r}: image extension {sample.image_ext!r} is not one of "
                                  f"{IMAGE_EXTENSIONS}")
        members = [(member_name(sample.key, sample.image_ext), sample.image)]
        if sample.mask is not None:
            members.append((member_name(sample.key, MASK_EXTENSION), sample.mask))
        sample_bytes = sum(_tar_member_bytes(len(data)) for _, data in members)
        if self._tar is not None and self._shard_count > 0 and (
                (self.max_count is not None and self._shard_count >= self.max_count)
                or (self.max_bytes is not None
                    and self._file.tell() + sample_bytes + 2 * TAR_BLOCK > self.max_bytes)):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        for name, data in members:
            _add_member(self._tar, name, data)
        self._shard_count += 1
        self._keys.add(sample.key)
        if sample.class_histogram is not None:
            self._histogram += sample.class_histogram
        size = [sample.height, sample.width]
        self._min_size = size if self._min_size is None else [min(a, b) for a, b in zip(self._min_size, size)]
        self._max_size = size if self._max_size is None else [max(a, b) for a, b in zip(self._max_size, size)]

    def close(self) -> dict:
        """Finish the last shard, remove stale shards of an earlier run, write manifest.json; return it."""
        if self.manifest is not None:
            return self.manifest
        if self._tar is not None:
            self._close_shard()
        written = {shard["name"] for shard in self._shards}
        for stale in self.out_dir.glob(SHARD_NAME_GLOB.format(split=self.split)):
            if stale.name not in written:
                stale.unlink()
        manifest = {
            "format": FORMAT,
            "dataset": self.dataset,
            "split": self.split,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "ignore_index": IGNORE_INDEX,
            "class_names": self.class_names,
            "has_masks": self.has_masks,
            "shards": self._shards,
        }
        if self.has_masks:
            manifest["class_pixel_histogram"] = self._histogram.tolist()
        manifest["image_size_range"] = {"min": self._min_size, "max": self._max_size}
        write_json_atomic(self.out_dir / MANIFEST_NAME, manifest)
        self.manifest = manifest
        return manifest

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            # Leave no half-written shard and no manifest behind after a failure.
            self._tar.close()
            self._file.close()
            (self.out_dir / (self._shard_name(len(self._shards)) + ".tmp")).unlink(missing_ok=True)


SampleLoader = Callable[[str, Any], EncodedSample]


def _load_record(loader: SampleLoader, record: tuple[str, Any]) -> EncodedSample:
    key, payload = record
    return loader(key, payload)


def encode_samples(records: Iterable[tuple[str, Any]], loader: SampleLoader, workers: int = 1,
                   desc: str = "encoding", progress: bool = True) -> Iterator[EncodedSample]:
    """Yield loader(key, payload) for every record in sorted key order, encoding in `workers` processes.

    loader must be picklable (a module-level function or a dataclass instance) when workers > 1. Results
    come back in input order, so the writer in the parent stays deterministic.
    """
    ordered = sorted(records, key=lambda record: record[0])
    task = partial(_load_record, loader)
    with tqdm(total=len(ordered), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1:
            for record in ordered:
                yield task(record)
                bar.update()
            return
        chunksize = max(1, min(32, len(ordered) // (workers * 8)))
        # Workers run only numpy/PIL code, so fork is safe on Linux and skips re-importing the package
        # (and torch with it) in every worker; elsewhere fork is unsafe and spawn is the default.
        start_method = "fork" if sys.platform == "linux" else "spawn"
        # A ProcessPoolExecutor, not a multiprocessing.Pool: on an error (a bad sample) or an early stop, the Pool's
        # terminate() kills workers that may hold its result queue's lock, after which it waits for that lock
        # forever (a CI run hung 10 minutes in it). Here the pending tasks are cancelled and the running ones
        # finish; no worker is killed.
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method))
        results = pool.map(task, ordered, chunksize=chunksize)
        try:
            for sample in results:
                yield sample
                bar.update()
        finally:
            results.close()  # cancels the chunks not started
            pool.shutdown(wait=True, cancel_futures=True)


def write_split(out_dir: Union[str, Path], split: str, dataset: str, records: Iterable[tuple[str, Any]],
                loader: SampleLoader, num_classes: Optional[int], class_names: Optional[Sequence[str]] = None,
                workers: int = 1, max_count: Optional[int] = None, max_bytes: Optional[Union[int, str]] = None,
                progress: bool = True) -> dict:
    """Encode records with loader (in parallel) and write them as one shard set; return the manifest."""
    with ShardSetWriter(out_dir, split, dataset, num_classes, class_names, max_count, max_bytes) as writer:
        for sample in encode_samples(records, loader, workers, desc=f"{dataset}/{split}", progress=progress):
            writer.write(sample)
    return writer.manifest
