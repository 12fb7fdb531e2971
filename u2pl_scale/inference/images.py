"""Reading any image a user has (any size; greyscale, palette, RGBA, CMYK, 16-bit; EXIF rotation applied) as
uint8 RGB, and writing masks, overlays and a contact sheet atomically."""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..atomic import atomic_path
from ..engine.outputs import _palette

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".jfif"}


def collect_inputs(inputs: list[str]) -> list[tuple[Path, str]]:
    """(file, output name without suffix) for each input: a directory (recursively, image suffixes only; names
    keep the relative path), a file, or a glob pattern. Duplicates are dropped, clashing names get _1, _2..."""
    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES):
                found.append((f, str(f.relative_to(p).with_suffix(""))))
        elif p.is_file():
            found.append((p, p.stem))
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"--input {item}: no such file, directory or matching pattern")
            found.extend((m, m.stem) for m in matches)
    seen_files, names, out = set(), set(), []
    for f, name in found:
        key = f.resolve()
        if key in seen_files:
            continue
        seen_files.add(key)
        unique, i = name, 0
        while unique in names:
            i += 1
            unique = f"{name}_{i}"
        names.add(unique)
        out.append((f, unique))
    return out


def load_rgb(path: Path) -> np.ndarray:
    """uint8 [H, W, 3]. EXIF orientation applied; 16-bit and float images scaled to 0..255 by their type's range
    (16-bit) or their own maximum (float); alpha dropped; palette, greyscale and CMYK converted."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(img).astype(np.float64)
            if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
                arr = arr / 257.0
            elif mode == "F":
                peak = arr.max(initial=0)
                arr = arr * (255.0 / peak) if peak > 1.0 else arr * 255.0
            grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def mask_image(mask: np.ndarray) -> Image.Image:
    """A palette PNG: pixel values are the class indices, colours the VOC map (as val_predictions.png)."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(_palette(256).flatten().tolist())
    return img


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colours = _palette(256)[mask.astype(np.uint8)]
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def save_atomic(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def contact_sheet(pairs: list[tuple[np.ndarray, np.ndarray]], path: Path, thumb: int = 160, columns: int = 4
                  ) -> None:
    """Thumbnails of image | overlay, `columns` pairs per row."""
    if not pairs:
        return
    tiles = []
    for image, over in pairs:
        row = np.concatenate([image, over], axis=1)
        t = Image.fromarray(row)
        t.thumbnail((2 * thumb, thumb))
        canvas = Image.new("RGB", (2 * thumb + 4, thumb + 4), "white")
        canvas.paste(t, (2, 2))
        tiles.append(canvas)
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    w, h = tiles[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * w, (i // cols) * h))
    save_atomic(sheet, path)
