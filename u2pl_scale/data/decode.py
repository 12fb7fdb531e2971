"""Safe decoding of WebDataset samples: images and 8-bit masks only, never pickles.

Shard members arrive as raw bytes keyed by extension (`jpg`, `png`, `seg.png`, ...). Only the members that
`shard_format` names (the image, the mask) are ever decoded, and only by PIL restricted to its PIL_FORMATS; every
other member (`.pyd`, `.pth`, `.npy`, `.json`, ...) is ignored unread and counted as an unexpected member.
Anything wrong with a sample raises `BadSample` naming the reason, the shard URL and the sample key, so the
stream can skip-and-count or fail.
"""
from __future__ import annotations

import io
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

# IMAGE_EXTENSIONS stays importable from here, where it was defined before shard_format existed
from u2pl_scale.data.shard_format import (IMAGE_EXTENSIONS, IMAGE_MODE, MASK_EXTENSION, MASK_MODES,  # noqa: F401
                                          PIL_FORMATS, image_member, unexpected_members)

# Every reason a sample or shard is skipped, plus ignored members; each batch's "bad" dict carries all of them.
BAD_REASONS = (
    "corrupt_image",
    "corrupt_mask",
    "missing_image",
    "missing_mask",
    "mask_size_mismatch",
    "label_out_of_range",
    "bad_shard",
    "unexpected_member",
)


class BadSample(Exception):
    """A sample (or a whole shard, reason "bad_shard") that cannot be used; names the shard URL and key."""

    def __init__(self, reason: str, url: str = "", key: str = "", detail: str = ""):
        self.reason, self.url, self.key, self.detail = reason, url, key, detail
        where = ", ".join(part for part in (f"shard {url}" if url else "", f"sample {key!r}" if key else "") if part)
        super().__init__(reason + (f": {detail}" if detail else "") + (f" ({where})" if where else ""))


class DecodedSample(NamedTuple):
    image: np.ndarray  # uint8 [H, W, 3]
    mask: Optional[np.ndarray]  # uint8 [H, W], class ids or ignore_index; None when not requested
    unexpected_members: int  # members that were ignored unread


def open_pil(data: bytes, what: str, url: str = "", key: str = "") -> Image.Image:
    """Fully decode image bytes with the shard format's PIL decoders only; BadSample(f"corrupt_{what}") otherwise
    (undecodable, truncated, another format, or more pixels than PIL's decompression-bomb limit)."""
    reason = f"corrupt_{what}"
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        width, height = img.size
        # Refuse decompression bombs before allocating the pixels.
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise BadSample(reason, url, key, f"{width}x{height} exceeds {Image.MAX_IMAGE_PIXELS} pixels")
        img.load()  # truncated or corrupt data fails here (LOAD_TRUNCATED_IMAGES stays False)
    except BadSample:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, UnidentifiedImageError, ...
        raise BadSample(reason, url, key, f"{type(exc).__name__}: {exc}") from None
    return img


def decode_image(data: bytes, url: str = "", key: str = "") -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP bytes (shard_format.PIL_FORMATS) to an RGB uint8 array [H, W, 3];
    BadSample("corrupt_image") otherwise."""
    img = open_pil(data, "image", url, key)
    if img.mode != IMAGE_MODE:
        img = img.convert(IMAGE_MODE)
    return np.asarray(img)


def decode_mask(data: bytes, url: str = "", key: str = "") -> np.ndarray:
    """Decode an 8-bit single-channel PNG mask to uint8 [H, W]; BadSample("corrupt_mask") otherwise."""
    img = open_pil(data, "mask", url, key)
    if img.mode not in MASK_MODES:
        raise BadSample("corrupt_mask", url, key, f"mask must be 8-bit single-channel, got PIL mode {img.mode}")
    return np.asarray(img)


def check_labels(mask: np.ndarray, num_classes: int, ignore_index: int, url: str = "", key: str = "") -> None:
    """Raise BadSample("label_out_of_range") if the mask holds a value outside [0, num_classes) other than ignore."""
    if int(mask.max(initial=0)) < num_classes:
        return  # common case: one reduction, no table lookup
    allowed = np.zeros(256, dtype=bool)
    allowed[:num_classes] = True
    allowed[ignore_index] = True
    bad_values = np.unique(mask[~allowed[mask]])
    if bad_values.size:
        raise BadSample("label_out_of_range", url, key,
                        f"values {bad_values[:8].tolist()} not in [0, {num_classes}) or {ignore_index}")


def decode_sample(members: dict, url: str, key: str, with_mask: bool, num_classes: int,
                  ignore_index: int = 255) -> DecodedSample:
    """Decode one sample from its raw members {extension: bytes}.

    with_mask: the sample must carry `seg.png` (labeled/val sets); for unlabeled sets a mask member is ignored
    without being decoded. Raises BadSample for a missing or corrupt image/mask, a mask whose size differs from
    the image, or labels out of range.
    """
    image_ext = image_member(members)
    unexpected = len(unexpected_members(members))
    if image_ext is None:
        raise BadSample("missing_image", url, key, f"no image member among {sorted(members)}")
    image = decode_image(members[image_ext], url, key)
    if not with_mask:
        return DecodedSample(image, None, unexpected)
    if MASK_EXTENSION not in members:
        raise BadSample("missing_mask", url, key, f"labeled sample has no {MASK_EXTENSION} member")
    mask = decode_mask(members[MASK_EXTENSION], url, key)
    if mask.shape != image.shape[:2]:
        raise BadSample("mask_size_mismatch", url, key,
                        f"mask {mask.shape[1]}x{mask.shape[0]} vs image {image.shape[1]}x{image.shape[0]}")
    check_labels(mask, num_classes, ignore_index, url, key)
    return DecodedSample(image, mask, unexpected)
