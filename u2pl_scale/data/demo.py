"""A procedurally generated segmentation dataset for demos, tests and benchmarks (no download).

Five object classes plus background. Each class has a SHAPE (disc, square, triangle, ring, cross), a usual
TEXTURE (stripes, checker, dots, smooth, grid) and a HUE FAMILY: its objects' hue is drawn within +-HUE_SPREAD of
the class's own hue, and neighbouring families overlap: a third of the objects have a hue only their class uses,
the other two thirds a hue two classes share, where shape and texture must decide (colour alone names the class
of about two objects in three). Objects have random scale,
aspect, rotation, position, saturation and brightness, may overlap and be cut by the border, and sit on
cluttered backgrounds (low-saturation gradients, distractor lines, pixel noise). Object borders are labelled 255
(ignore), as in VOC.

The task is sized so that a small CNN trained from scratch for a few CPU minutes learns it (colour quickly; the
shapes and textures that resolve the overlaps more slowly). 256 train images, 1/16 of them (16) labeled: with a
pretrained backbone (demo_backbone.py, as the published settings start from ImageNet weights) 16 labels leave a
clear gap to full supervision that the unlabeled images can close.

Every image is a pure function of (seed, split, index), so a build is deterministic and can be parallelised.
"""
from __future__ import annotations

import colorsys
import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from u2pl_scale.data.writer import IGNORE_INDEX, EncodedSample, ShardSetWriter, encode_sample, encode_samples

CLASS_NAMES = ["background", "disc", "square", "triangle", "ring", "cross"]
NUM_CLASSES = len(CLASS_NAMES)
SHAPES = CLASS_NAMES[1:]
TEXTURES = ["stripes", "checker", "dots", "smooth", "grid"]  # TEXTURES[i] is the usual texture of SHAPES[i]
TEXTURE_SWAP_PROB = 0.1  # how often an object wears a random texture, so texture alone is not enough
# object hue = class hue (k - 1) / 5 +- this fraction of the hue circle: families 0.3 wide, 0.2 apart, so neighbours
# share 0.1-wide bands. 0.25 (every hue shared by 2-3 classes) was tried: the teacher then made whole-object,
# confident colour mistakes that entropy cannot flag, and self-training confirmed them.
HUE_SPREAD = 0.15
BACKGROUND_MAX_SATURATION = 0.3
DEMO_SPLITS = ("labeled", "unlabeled", "val", "full_labeled")
# the manifests' dataset name; a new generator gets a new name so that shards built by an older one are rebuilt
DEMO_DATASET = "demo-v4"  # v4: 256 train images (16 labeled) instead of 1024
_TRAIN_STREAM, _VAL_STREAM = 0, 1


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inside test for a shape in its local frame; sizes are chosen so all shapes cover a similar area (~2.5)."""
    if shape == "disc":
        return u * u + v * v <= 0.8
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        # Equilateral triangle: three half-planes at distance 0.7 from the centre.
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.all([u * math.cos(a) + v * math.sin(a) <= 0.7 for a in angles], axis=0)
    if shape == "ring":
        radius = np.sqrt(u * u + v * v)
        return (radius <= 1.0) & (radius >= rng.uniform(0.45, 0.65))
    if shape == "cross":
        half_width = rng.uniform(0.22, 0.34)
        return ((np.abs(u) <= half_width) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= half_width) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture pattern in [0, 1] over pixel coordinates x, y (already rotated into the object's frame)."""
    period = rng.uniform(3.0, 7.0)
    if texture == "stripes":
        return (np.sin(2 * math.pi * x / period) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    if texture == "dots":
        dx = (x / period) % 1.0 - 0.5
        dy = (y / period) % 1.0 - 0.5
        return (dx * dx + dy * dy < rng.uniform(0.05, 0.1)).astype(np.float32)
    if texture == "grid":
        return (((x / period) % 1.0 < 0.3) | ((y / period) % 1.0 < 0.3)).astype(np.float32)
    if texture == "smooth":
        return np.clip(0.5 + 0.05 * (x + y) / period * rng.uniform(-1, 1), 0, 1).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _paint(image: np.ndarray, region: np.ndarray, pattern: np.ndarray, class_id: int,
           rng: np.random.Generator) -> None:
    """Paint an object: a hue from its class's family, two tones of it (light, dark) mixed by pattern."""
    _paint_hue(image, region, pattern, (class_id - 1) / len(SHAPES) + rng.uniform(-HUE_SPREAD, HUE_SPREAD), rng)


def _paint_hue(image: np.ndarray, region: np.ndarray, pattern: np.ndarray, hue: float,
               rng: np.random.Generator) -> None:
    """Paint `region` in two tones (light, dark) of `hue` mixed by `pattern`, random saturation and value."""
    saturation, value = rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
    light = _hsv_to_rgb(hue, saturation, value)
    dark = _hsv_to_rgb(hue, saturation, value * rng.uniform(0.3, 0.6))
    image[region] = light + (dark - light) * pattern[region][:, None]


def _background_colour(rng: np.random.Generator, value_range=(0.2, 0.9)) -> np.ndarray:
    return _hsv_to_rgb(rng.uniform(), rng.uniform(0, BACKGROUND_MAX_SATURATION), rng.uniform(*value_range))


def _rotated_frame(size: int, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y, x = y - cy, x - cx
    cos, sin = math.cos(angle), math.sin(angle)
    return cos * x + sin * y, -sin * x + cos * y


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient between two low-saturation colours plus clutter: distractor lines of random width (background)."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    y, x = np.meshgrid(ramp, ramp, indexing="ij")
    weight = np.clip(0.5 + (math.cos(direction) * (x - 0.5) + math.sin(direction) * (y - 0.5)), 0, 1)
    start, end = _background_colour(rng), _background_colour(rng)
    image = start + (end - start) * weight[..., None]
    for _ in range(rng.integers(2, 7)):  # lines of random width
        u, v = _rotated_frame(size, *rng.uniform(0, size, size=2), rng.uniform(0, math.pi))
        region = np.abs(v) <= rng.uniform(0.5, 1.8)
        image[region] = _background_colour(rng, (0.1, 1.0))
    return image


def _place_shape(size: int, shape: str, radius_range: tuple[float, float], centre_range: tuple[float, float],
                 rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Region of one object: random radius (a fraction of `size`), aspect, centre and rotation -> (mask, cy, cx)."""
    radius = rng.uniform(*radius_range) * size
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    cy, cx = rng.uniform(*centre_range, size=2) * size
    u, v = _rotated_frame(size, cy, cx, rng.uniform(0, 2 * math.pi))
    return _shape_mask(shape, u / (radius * aspect), v * aspect / radius, rng), cy, cx


def _texture_pattern(size: int, texture: str, cy: float, cx: float, rng: np.random.Generator) -> np.ndarray:
    """The texture in its own random orientation about the object's centre."""
    texture_u, texture_v = _rotated_frame(size, cy, cx, rng.uniform(0, math.pi))
    return _texture(texture, texture_u, texture_v, rng)


def _add_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise of a random strength, then uint8."""
    image += rng.normal(0, rng.uniform(4, 16), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _object_border(label: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another label: the ignore band VOC draws around objects."""
    padded = np.pad(label, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    border = np.zeros(label.shape, dtype=bool)
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        border |= shifted != centre
    return border


def generate_sample(seed: int, stream: int, index: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint8 HxWx3, mask uint8 HxW) for one demo sample; a pure function of its arguments."""
    rng = np.random.default_rng([seed, stream, index])
    image = _background(size, rng)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        class_id = int(rng.integers(1, NUM_CLASSES))
        region, cy, cx = _place_shape(size, SHAPES[class_id - 1], (0.12, 0.3), (-0.05, 1.05), rng)
        if region.sum() < 0.002 * size * size:
            continue  # almost entirely outside the image
        texture = TEXTURES[class_id - 1] if rng.random() > TEXTURE_SWAP_PROB else rng.choice(TEXTURES)
        _paint(image, region, _texture_pattern(size, texture, cy, cx, rng), class_id, rng)
        label[region] = class_id  # later objects occlude earlier ones
    label[_object_border(label)] = IGNORE_INDEX
    return _add_noise(image, rng), label


@dataclass(frozen=True)
class DemoSampleLoader:
    """Picklable loader for encode_samples: payload = (stream, index)."""

    seed: int
    size: int

    def __call__(self, key: str, payload: tuple[int, int]) -> EncodedSample:
        stream, index = payload
        image, mask = generate_sample(self.seed, stream, index, self.size)
        return encode_sample(key, image, mask, num_classes=NUM_CLASSES)


def build_demo(out_root: Union[str, Path] = "shards/demo", seed: int = 0, num_train: int = 256,
               labeled_fraction: float = 1 / 16, num_val: int = 128, size: int = 96,
               samples_per_shard: int = 64, workers: int = 1, progress: bool = True) -> dict[str, dict]:
    """Write the demo shard sets under out_root and return their manifests by split name.

    out_root/labeled: the first round(num_train * labeled_fraction) train images with masks;
    out_root/unlabeled: the other train images, without masks; out_root/val: num_val images with masks;
    out_root/full_labeled: all num_train train images with masks (fully supervised reference only).
    Train images are i.i.d., so taking the first ones as labeled is an unbiased choice.
    """
    num_labeled = round(num_train * labeled_fraction)
    if not 0 < num_labeled < num_train:
        raise ValueError(f"labeled_fraction {labeled_fraction} of {num_train} train images gives "
                         f"{num_labeled} labeled; need at least 1 labeled and 1 unlabeled")
    out_root = Path(out_root)
    loader = DemoSampleLoader(seed, size)

    def open_writer(split_dir: str, split: str) -> ShardSetWriter:
        return ShardSetWriter(out_root / split_dir, split, DEMO_DATASET, NUM_CLASSES, CLASS_NAMES,
                              max_count=samples_per_shard)

    with contextlib.ExitStack() as stack:  # on failure every writer removes its unfinished shard
        writers = {name: stack.enter_context(open_writer(name, "labeled" if name == "full_labeled" else name))
                   for name in DEMO_SPLITS}
        # One pass over the train images feeds three sets, so each image is generated once.
        train_records = [(f"train_{index:06d}", (_TRAIN_STREAM, index)) for index in range(num_train)]
        labeled_keys = {key for key, _ in train_records[:num_labeled]}
        for sample in encode_samples(train_records, loader, workers, desc="demo/train", progress=progress):
            writers["full_labeled"].write(sample)
            if sample.key in labeled_keys:
                writers["labeled"].write(sample)
            else:
                writers["unlabeled"].write(sample.without_mask())
        val_records = [(f"val_{index:06d}", (_VAL_STREAM, index)) for index in range(num_val)]
        for sample in encode_samples(val_records, loader, workers, desc="demo/val", progress=progress):
            writers["val"].write(sample)
        return {name: writer.close() for name, writer in writers.items()}


def demo_manifest_paths(out_root: Union[str, Path] = "shards/demo") -> dict[str, Path]:
    """manifest.json path of every demo set; all exist once build_demo has finished."""
    return {name: Path(out_root) / name / "manifest.json" for name in DEMO_SPLITS}


def demo_state(out_root: Union[str, Path]) -> str:
    """What is at a demo root: "ready" (every set finished by this generator), "missing" (nothing there),
    "unfinished" (a set without its manifest, which the build writes last), "stale" (written by an older demo
    generator) or "foreign" (a manifest of some other dataset: never the demo's to replace)."""
    if not Path(out_root).exists():
        return "missing"
    names = [str(json.loads(path.read_text()).get("dataset", "")) if path.is_file() else None
             for path in demo_manifest_paths(out_root).values()]
    if any(name is not None and not name.startswith("demo") for name in names):
        return "foreign"
    if any(name is not None and name != DEMO_DATASET for name in names):
        return "stale"
    return "unfinished" if None in names else "ready"


@contextlib.contextmanager
def _build_lock(out_root: Path):
    """An exclusive lock on `.<root name>.lock` beside the root, held while one process checks and builds: a second
    process (another job, another test worker, another rank group on the node) waits, then finds the build ready."""
    import fcntl

    out_root.parent.mkdir(parents=True, exist_ok=True)
    with open(out_root.parent / f".{out_root.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo(out_root: Union[str, Path] = "shards/demo", progress: bool = True) -> bool:
    """Build the demo at out_root unless a finished build of this generator is there; True when it built.
    A missing, unfinished or stale build is replaced as a whole; a root holding another dataset is an error.
    Processes calling this for the same root at once build it once (a file lock beside the root)."""
    out_root = Path(out_root)
    if demo_state(out_root) == "ready":  # the common case, without touching a lock file
        return False
    with _build_lock(out_root):
        state = demo_state(out_root)  # again: another process may have built it while this one waited
        if state == "ready":
            return False
        if state == "foreign":
            raise FileExistsError(f"{out_root} holds a dataset that is not the demo's; not replacing it")
        if state != "missing":
            print(f"[u2pl] demo shards at {out_root} are "
                  f"{'from an older generator' if state == 'stale' else state}; rebuilding them", flush=True)
            shutil.rmtree(out_root)
        else:
            print(f"[u2pl] demo shards missing at {out_root}; building them", flush=True)
        build_demo(out_root=out_root, progress=progress)
    return True
