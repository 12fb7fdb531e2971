"""The shard format ("u2pl-shards/1"): the one definition the writer, the reader and the inspector all use.

A shard set is one directory holding `{split}-{index:06d}.tar` shards and a `manifest.json` written last. A sample
is the run of consecutive tar members sharing a key: one RGB image `{key}.{ext}` (ext one of IMAGE_EXTENSIONS)
and, in labeled/val sets, an 8-bit single-channel mask `{key}.seg.png` holding class ids < num_classes or
IGNORE_INDEX. Unlabeled samples carry no mask. Any other member is unexpected: the reader ignores it unread, the
inspector reports it. Nothing here decodes or reads files; it only names what belongs where.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

FORMAT = "u2pl-shards/1"
MANIFEST_NAME = "manifest.json"
SPLITS = ("labeled", "unlabeled", "val")
SPLITS_WITH_MASKS = ("labeled", "val")
IGNORE_INDEX = 255

# Image member extension -> the PIL format it names; the order is the order a reader looks for them. The bytes may
# hold any of PIL_FORMATS whatever the extension: the reader lets PIL detect the format.
IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}
IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)
# The only PIL decoders ever run on shard bytes: keeping PIL away from formats that shell out (EPS) or are exotic.
PIL_FORMATS = tuple(dict.fromkeys(IMAGE_FORMATS.values()))
WRITTEN_IMAGE_EXTENSIONS = ("jpg", "png")  # what the writer produces (JPEG/PNG); readers take all of the above
IMAGE_MODE = "RGB"  # what the writer stores; a reader converts other modes, the inspector reports them
MASK_EXTENSION = "seg.png"
MASK_MODES = ("L", "P")  # 8-bit single channel; "P" keeps the palette indices as class ids

# Keys the writer accepts: WebDataset splits a member name at the first dot of its base name into key and
# extension, so a key holds no dot; '/' separates path parts.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
# How a reader splits a member name: the key is the path up to the first dot of the file name, the rest the
# extension (compared in lower case).
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

SHARD_NAME_GLOB = "{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"
# Manifest fields, every one always written; MASK_MANIFEST_FIELDS only for sets with masks.
MANIFEST_FIELDS = ("format", "dataset", "split", "num_samples", "num_classes", "ignore_index", "class_names",
                   "has_masks", "shards", "image_size_range")
MASK_MANIFEST_FIELDS = ("class_pixel_histogram",)  # pixels per class id, ignore excluded
SHARD_ENTRY_FIELDS = ("name", "num_samples", "sha256", "size")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def member_name(key: str, extension: str) -> str:
    return f"{key}.{extension}"


def is_valid_key(key: str) -> bool:
    return KEY_PATTERN.match(key) is not None


def safe_key(name: str) -> str:
    """A file stem made into a key: characters a key cannot hold (dots, spaces, '/') become '_'."""
    return _UNSAFE_KEY_CHARS.sub("_", name)


def split_member_name(name: str) -> Optional[tuple[str, str]]:
    """(key, lower-case extension) of a tar member name, or None for a name without an extension."""
    match = MEMBER_NAME.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def image_members(members: Mapping[str, object]) -> list[str]:
    """The image extensions among a sample's member extensions, in IMAGE_EXTENSIONS order."""
    return [ext for ext in IMAGE_EXTENSIONS if ext in members]


def image_member(members: Mapping[str, object]) -> Optional[str]:
    """The extension of a sample's image member (the first of IMAGE_EXTENSIONS present), None without one."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)


def unexpected_members(members: Mapping[str, object]) -> list[str]:
    """Member extensions that are neither the sample's image nor its mask (a second image counts too)."""
    known = {image_member(members), MASK_EXTENSION}
    return [ext for ext in members if ext not in known]
