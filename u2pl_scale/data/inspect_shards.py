"""Read-only inspection of built shard sets (`python shards/build.py inspect`): counts, image sizes, the label
histogram, and every sample that breaks the format or that the reader would skip.

What a sample may hold comes from u2pl_scale.data.shard_format and images and masks are decoded with the reader's
own u2pl_scale.data.decode.open_pil, so the inspector and the reader agree on what is an image member, which
decoders run and how members group into samples. The inspector is stricter only where the format is: it also
reports members the reader ignores (non-image members, a second image, a repeated member), non-RGB images (the
reader converts them) and entries that are not regular files. Members are read as bytes and only decoded by PIL;
nothing is ever unpickled.
"""
from __future__ import annotations

import glob
import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from u2pl_scale.data.decode import BadSample, open_pil
from u2pl_scale.data.shard_format import (FORMAT, IGNORE_INDEX, IMAGE_EXTENSIONS, IMAGE_MODE, MANIFEST_NAME,
                                          MASK_EXTENSION, MASK_MODES, image_members, split_member_name)
from u2pl_scale.data.writer import ShardWriteError


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
            lines.append(f"  no usable {MANIFEST_NAME} (unfinished build or loose tars)")
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
        manifests = [path / MANIFEST_NAME] if (path / MANIFEST_NAME).is_file() else sorted(
            path.glob(f"*/{MANIFEST_NAME}"))
        if manifests:
            return [(str(m.parent), sorted(m.parent.glob("*.tar")), m) for m in manifests]
        return [(str(path), sorted(path.glob("*.tar")), None)]
    tars = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(target, recursive=True))
    if not tars:
        raise ShardWriteError(f"{target}: no shard set directory, tar file or matching files")
    return [(target, tars, None)]


def _read_manifest(path: Path, problems: list[str]) -> Optional[dict]:
    """The manifest, or None (with the reason in problems) when it cannot be used to check the set."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        problems.append(f"{path.name}: unreadable: {error}")
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        problems.append(f"{path.name}: format {found!r}, expected {FORMAT!r}")
        return None
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        problems.append(f"{path.name}: 'shards' must be a list of entries with a name")
        return None
    return manifest


def _read_samples(tar_path: Path, problems: list[str]) -> Optional[list[tuple[str, dict[str, bytes]]]]:
    """(key, {extension: bytes}) per sample, grouped as the reader groups them: a sample is a run of consecutive
    members with the same key, and a repeated member keeps its first copy. None for an unreadable tar."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile():
                    problems.append(f"{tar_path.name}:{member.name}: not a regular file")
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    problems.append(f"{tar_path.name}:{member.name}: member name has no extension (key.ext)")
                    continue
                key, extension = parts
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                members = samples[-1][1]
                if extension in members:
                    problems.append(f"{tar_path.name}:{key}: repeated member {extension!r} (the reader keeps the "
                                    "first)")
                    continue
                members[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        problems.append(f"{tar_path}: unreadable tar: {error}")
        return None
    return samples


def _inspect_sample(report: SetReport, where: str, members: dict[str, bytes], num_classes: Optional[int],
                    has_masks: Optional[bool]) -> None:
    images = image_members(members)
    others = [ext for ext in members if ext not in IMAGE_EXTENSIONS and ext != MASK_EXTENSION]
    if others:
        report.problems.append(f"{where}: non-image members {others} (never unpickled or decoded)")
    if len(images) != 1:
        report.problems.append(f"{where}: expected one image member, found {images}")
        return
    try:
        with open_pil(members[images[0]], "image") as image:
            size, mode = [image.height, image.width], image.mode
    except BadSample as error:
        report.problems.append(f"{where}.{images[0]}: corrupt image: {error.detail}")
        return
    if mode != IMAGE_MODE:
        report.problems.append(f"{where}.{images[0]}: image mode {mode}, expected {IMAGE_MODE}")
    report.samples += 1
    report.min_size = size if report.min_size is None else [min(a, b) for a, b in zip(report.min_size, size)]
    report.max_size = size if report.max_size is None else [max(a, b) for a, b in zip(report.max_size, size)]
    if MASK_EXTENSION not in members:
        if has_masks:
            report.problems.append(f"{where}: no {MASK_EXTENSION} member, but the set has masks")
        return
    try:
        with open_pil(members[MASK_EXTENSION], "mask") as decoded:
            mask_mode, mask = decoded.mode, np.array(decoded)
    except BadSample as error:
        report.problems.append(f"{where}.{MASK_EXTENSION}: corrupt mask: {error.detail}")
        return
    report.masks += 1
    if mask_mode not in MASK_MODES:
        report.problems.append(f"{where}.{MASK_EXTENSION}: mask mode {mask_mode}, expected 8-bit single channel "
                               f"({' or '.join(MASK_MODES)})")
        return
    if list(mask.shape) != size:
        report.problems.append(f"{where}: mask shape {list(mask.shape)} differs from image shape {size}")
    report.histogram += np.bincount(mask.ravel(), minlength=256)
    if num_classes is not None:
        bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)]).tolist()
        if bad:
            report.problems.append(f"{where}: labels {bad[:20]} outside [0, {num_classes}) and not {IGNORE_INDEX}")


def inspect_shards(target: str) -> InspectionReport:
    """Read shard sets without changing them and report counts, sizes, label histogram and bad samples.

    Members are read as bytes and only decoded with PIL; nothing is ever unpickled. Checks each sample
    (image decodes as RGB, mask is 8-bit, same size, labels in range, present where the set has masks),
    unexpected members, duplicate keys, and, with a manifest, shard checksums, per-shard counts and the recorded
    class histogram.
    """
    reports = []
    for location, tars, manifest_path in _find_shard_sets(target):
        problems: list[str] = []
        manifest = _read_manifest(manifest_path, problems) if manifest_path else None
        report = SetReport(location, manifest, histogram=np.zeros(256, dtype=np.int64), problems=problems)
        num_classes = manifest.get("num_classes") if manifest else None
        has_masks = manifest.get("has_masks") if manifest else None
        listed = {s["name"]: s for s in manifest["shards"]} if manifest else {}
        for name in sorted(set(listed) - {tar.name for tar in tars}):
            report.problems.append(f"{name}: listed in {MANIFEST_NAME} but missing")
        seen_keys: set[str] = set()
        for tar_path in tars:
            report.shards += 1
            before = report.samples
            samples = _read_samples(tar_path, report.problems)
            if samples is None:
                continue
            for key, members in samples:
                if key in seen_keys:
                    report.problems.append(f"{tar_path.name}:{key}: duplicate key")
                seen_keys.add(key)
                _inspect_sample(report, f"{tar_path.name}:{key}", members, num_classes, has_masks)
            entry = listed.get(tar_path.name)
            if manifest and entry is None:
                report.problems.append(f"{tar_path.name}: not listed in {MANIFEST_NAME}")
            elif entry is not None:
                digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
                if digest != entry.get("sha256"):
                    report.problems.append(f"{tar_path.name}: sha256 differs from {MANIFEST_NAME}")
                if report.samples - before != entry.get("num_samples"):
                    report.problems.append(f"{tar_path.name}: {report.samples - before} good samples, "
                                           f"manifest says {entry.get('num_samples')}")
        recorded = manifest.get("class_pixel_histogram") if manifest else None
        if recorded is not None and list(recorded) != report.histogram[:len(recorded)].tolist():
            report.problems.append(f"class_pixel_histogram in {MANIFEST_NAME} differs from the masks")
        reports.append(report)
    return InspectionReport(reports)
