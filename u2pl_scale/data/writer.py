"""Shard writing: validated samples -> size-bounded, deterministic WebDataset tar shards + manifest.json.

On-disk format ("u2pl-shards/1", read by u2pl_scale.data.stream): a shard set is one directory holding
`{split}-{index:06d}.tar` shards and a `manifest.json` written last. Each sample is `{key}.jpg|png` (RGB) and,
for labeled/val sets, `{key}.seg.png` (8-bit single-channel mask, values < num_classes or 255 = ignore).
Unlabeled samples carry no mask at all.

Determinism: members are written in sorted key order with fixed tar metadata (mtime 0, uid/gid 0, no user
names), so the same input gives byte-identical shards whatever the number of encoding workers.
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from u2pl_scale.atomic import write_json_atomic

FORMAT = "u2pl-shards/1"
IGNORE_INDEX = 255
SPLITS = ("labeled", "unlabeled", "val")
MASK_SUFFIX = "seg.png"
TAR_BLOCK = 512
DEFAULT_MAX_BYTES = 256 * 1000**2  # small enough that a multi-node run gets several shards per rank

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
# WebDataset splits a member name at the first dot of its base name into key and extension.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


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
    image_ext: str  # "jpg" or "png"
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
            if file_format in ("JPEG", "PNG") and mode == "RGB":
                return image, "jpg" if file_format == "JPEG" else "png", height, width
            # Grayscale, CMYK, palette or other formats: store as RGB so every reader sees 3 channels.
            rgb = decoded.convert("RGB")
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
    if not _KEY_PATTERN.match(key):
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
        (self.out_dir / "manifest.json").unlink(missing_ok=True)
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
        return f"{self.split}-{index:06d}.tar"

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
        members = [(f"{sample.key}.{sample.image_ext}", sample.image)]
        if sample.mask is not None:
            members.append((f"{sample.key}.{MASK_SUFFIX}", sample.mask))
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
        for stale in self.out_dir.glob(f"{self.split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
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
        write_json_atomic(self.out_dir / "manifest.json", manifest)
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


# ---------------------------------------------------------------- read-only inspection

IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png")


@dataclass
class SetReport:
    """What inspect_shards found in one shard set (a directory, or the loose tars of a pattern)."""

    location: str
    manifest: Optional[dict]
    shards: int = 0
    samples: int = 0
    masks: int = 0
    min_size: Optional[list[int]] = None
    max_size: Optional[list[int]] = None
    histogram: Optional[np.ndarray] = None  # pixels per label value 0..255
    problems: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{self.location}: {self.samples} samples ({self.masks} with masks) in {self.shards} shard(s)"]
        if self.manifest is None:
            lines.append("  no manifest.json (unfinished build or loose tars)")
        else:
            lines.append(f"  dataset {self.manifest.get('dataset')!r}, split {self.manifest.get('split')!r}, "
                         f"num_classes {self.manifest.get('num_classes')}")
        if self.min_size is not None:
            lines.append(f"  image size (h, w): min {self.min_size}, max {self.max_size}")
        if self.histogram is not None and self.masks:
            names = (self.manifest or {}).get("class_names") or []
            total = max(1, int(self.histogram.sum()))
            for value in np.nonzero(self.histogram)[0]:
                name = "ignore" if value == IGNORE_INDEX else (names[value] if value < len(names) else "")
                lines.append(f"  label {value:3d} {name:>16s}: {self.histogram[value]:>14d} px "
                             f"({100 * self.histogram[value] / total:5.2f}%)")
        lines += [f"  BAD: {problem}" for problem in self.problems] or ["  no problems found"]
        return "\n".join(lines)


@dataclass
class InspectionReport:
    sets: list[SetReport]

    @property
    def problems(self) -> list[str]:
        return [problem for report in self.sets for problem in report.problems]

    def format(self) -> str:
        return "\n".join(report.format() for report in self.sets)


def _find_shard_sets(target: str) -> list[tuple[str, list[Path], Optional[Path]]]:
    """(location, tar files, manifest path or None) for a set directory, a directory of sets, a tar or a glob."""
    path = Path(target)
    if path.is_dir():
        manifests = [path / "manifest.json"] if (path / "manifest.json").is_file() else sorted(
            path.glob("*/manifest.json"))
        if manifests:
            return [(str(m.parent), sorted(m.parent.glob("*.tar")), m) for m in manifests]
        return [(str(path), sorted(path.glob("*.tar")), None)]
    tars = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(target, recursive=True))
    if not tars:
        raise ShardWriteError(f"{target}: no shard set directory, tar file or matching files")
    return [(target, tars, None)]


def _inspect_sample(report: SetReport, where: str, members: dict[str, bytes], num_classes: Optional[int]) -> None:
    images = [ext for ext in members if ext in IMAGE_MEMBER_EXTENSIONS]
    others = [ext for ext in members if ext not in IMAGE_MEMBER_EXTENSIONS and ext != MASK_SUFFIX]
    if others:
        report.problems.append(f"{where}: non-image members {others} (never unpickled or decoded)")
    if len(images) != 1:
        report.problems.append(f"{where}: expected one image member, found {images}")
        return
    try:
        with Image.open(io.BytesIO(members[images[0]])) as image:
            image.load()
            size, mode = [image.height, image.width], image.mode
    except (OSError, SyntaxError, ValueError) as error:
        report.problems.append(f"{where}.{images[0]}: corrupt image: {error}")
        return
    if mode != "RGB":
        report.problems.append(f"{where}.{images[0]}: image mode {mode}, expected RGB")
    report.samples += 1
    report.min_size = size if report.min_size is None else [min(a, b) for a, b in zip(report.min_size, size)]
    report.max_size = size if report.max_size is None else [max(a, b) for a, b in zip(report.max_size, size)]
    if MASK_SUFFIX not in members:
        return
    try:
        with Image.open(io.BytesIO(members[MASK_SUFFIX])) as decoded:
            decoded.load()
            mask_mode, mask = decoded.mode, np.array(decoded)
    except (OSError, SyntaxError, ValueError) as error:
        report.problems.append(f"{where}.{MASK_SUFFIX}: corrupt mask: {error}")
        return
    report.masks += 1
    if mask_mode != "L":
        report.problems.append(f"{where}.{MASK_SUFFIX}: mask mode {mask_mode}, expected L (8-bit single channel)")
        return
    if list(mask.shape) != size:
        report.problems.append(f"{where}: mask shape {list(mask.shape)} differs from image shape {size}")
    report.histogram += np.bincount(mask.ravel(), minlength=256)
    if num_classes is not None:
        bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)]).tolist()
        if bad:
            report.problems.append(f"{where}: labels {bad[:20]} outside [0, {num_classes}) and not 255")


def inspect_shards(target: str) -> InspectionReport:
    """Read shard sets without changing them and report counts, sizes, label histogram and bad samples.

    Members are read as bytes and only decoded with PIL; nothing is ever unpickled. Checks each sample
    (image decodes as RGB, mask is 8-bit, same size, labels in range), unexpected members, duplicate keys,
    and, with a manifest, shard checksums, per-shard counts and the recorded class histogram.
    """
    reports = []
    for location, tars, manifest_path in _find_shard_sets(target):
        manifest = json.loads(manifest_path.read_text()) if manifest_path else None
        num_classes = manifest.get("num_classes") if manifest else None
        report = SetReport(location, manifest, histogram=np.zeros(256, dtype=np.int64))
        listed = {s["name"]: s for s in manifest["shards"]} if manifest else {}
        for name in sorted(set(listed) - {tar.name for tar in tars}):
            report.problems.append(f"{name}: listed in manifest.json but missing")
        seen_keys: set[str] = set()
        for tar_path in tars:
            report.shards += 1
            before = report.samples
            try:
                with tarfile.open(tar_path) as tar:
                    members: dict[str, dict[str, bytes]] = {}
                    for member in tar:
                        if not member.isfile():
                            report.problems.append(f"{tar_path.name}:{member.name}: not a regular file")
                            continue
                        key, _, extension = member.name.partition(".")
                        members.setdefault(key, {})[extension] = tar.extractfile(member).read()
            except (tarfile.TarError, OSError) as error:
                report.problems.append(f"{tar_path}: unreadable tar: {error}")
                continue
            for key, sample in members.items():
                if key in seen_keys:
                    report.problems.append(f"{tar_path.name}:{key}: duplicate key")
                seen_keys.add(key)
                _inspect_sample(report, f"{tar_path.name}:{key}", sample, num_classes)
            entry = listed.get(tar_path.name)
            if manifest and entry is None:
                report.problems.append(f"{tar_path.name}: not listed in manifest.json")
            elif entry is not None:
                digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
                if digest != entry["sha256"]:
                    report.problems.append(f"{tar_path.name}: sha256 differs from manifest.json")
                if report.samples - before != entry["num_samples"]:
                    report.problems.append(f"{tar_path.name}: {report.samples - before} good samples, "
                                           f"manifest says {entry['num_samples']}")
        recorded = manifest.get("class_pixel_histogram") if manifest else None
        if recorded is not None and list(recorded) != report.histogram[:len(recorded)].tolist():
            report.problems.append("class_pixel_histogram in manifest.json differs from the masks")
        reports.append(report)
    return InspectionReport(reports)
