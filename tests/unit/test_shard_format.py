"""One definition of the shard format (u2pl_scale.data.shard_format) drives the writer, the reader and the inspector.

Every image extension the format names is written, read back by the reader and passes the inspector; every member
or encoding the reader does not accept is flagged by the inspector. All on real tar files of real PIL-encoded images.
"""
from __future__ import annotations

import collections
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2pl_scale.config import DataConfig
from u2pl_scale.data import shard_format, stream
from u2pl_scale.data.decode import BadSample, decode_sample
from u2pl_scale.data.inspect_shards import inspect_shards
from u2pl_scale.data.stream import iter_shard, make_val_loader
from u2pl_scale.data.writer import EncodedSample, ShardSetWriter, ShardWriteError, encode_sample

NUM_CLASSES = 3
HEIGHT, WIDTH = 10, 14


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _mask(seed: int) -> np.ndarray:
    mask = np.random.default_rng(seed + 1000).integers(0, NUM_CLASSES, (HEIGHT, WIDTH)).astype(np.uint8)
    mask[0, :2] = 255
    return mask


def _encode(image: Image.Image, pil_format: str) -> bytes:
    buffer = io.BytesIO()
    # lossless WebP, so the decoded pixels can be compared with the array exactly
    image.save(buffer, format=pil_format, **({"lossless": True} if pil_format == "WEBP" else {}))
    return buffer.getvalue()


def _expected_pixels(array: np.ndarray, data: bytes, pil_format: str) -> np.ndarray:
    """The array itself for lossless formats; for JPEG what PIL decodes from the bytes, opened directly."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) if pil_format == "JPEG" else array


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _read(tar_path: Path, counted: dict = None) -> list[tuple[str, dict]]:
    """What the reader makes of a tar: (key, {extension: bytes}) per sample; a bad shard raises, and what it
    counts must be `counted` (nothing by default)."""
    counts = collections.Counter()
    samples = list(iter_shard(str(tar_path), "error", counts))
    assert counts == collections.Counter(counted or {})
    return samples


# --------------------------------------------------------------------------------- accepted by all three

@pytest.mark.parametrize("extension", shard_format.IMAGE_EXTENSIONS)
def test_every_image_extension_is_read_and_passes_the_inspector(tmp_path, extension):
    pil_format = shard_format.IMAGE_FORMATS[extension]
    array, mask = _image(0), _mask(0)
    data = _encode(Image.fromarray(array), pil_format)
    # upper case too: the reader compares extensions in lower case, so the inspector must
    name = extension.upper() if extension in ("jpeg", "bmp") else extension
    tar_path = _write_tar(tmp_path / "x.tar", [(f"k.{name}", data), ("k.seg.png", _encode(Image.fromarray(mask),
                                                                                           "PNG"))])
    (key, members), = _read(tar_path)
    decoded = decode_sample(members, str(tar_path), key, True, NUM_CLASSES)
    assert key == "k" and decoded.unexpected_members == 0
    assert np.array_equal(decoded.image, _expected_pixels(array, data, pil_format))
    assert np.array_equal(decoded.mask, mask)

    report = inspect_shards(str(tar_path))
    assert report.problems == []
    (found,) = report.sets
    assert (found.samples, found.masks, found.min_size) == (1, 1, [HEIGHT, WIDTH])
    assert found.histogram.tolist() == np.bincount(mask.ravel(), minlength=256).tolist()


def test_a_set_of_every_image_extension_streams_and_inspects_clean(tmp_path):
    """Written by ShardSetWriter (any extension of the format), read by make_val_loader with verified checksums,
    inspected with its manifest: all three agree on every sample."""
    expected = {}
    with ShardSetWriter(tmp_path, "val", "toy", NUM_CLASSES, max_count=2) as writer:
        for index, extension in enumerate(shard_format.IMAGE_EXTENSIONS):
            pil_format = shard_format.IMAGE_FORMATS[extension]
            array, mask = _image(index), _mask(index)
            data = _encode(Image.fromarray(array), pil_format)
            histogram = np.bincount(mask.ravel(), minlength=256)[:NUM_CLASSES]
            writer.write(EncodedSample(f"s{index}", data, extension, HEIGHT, WIDTH,
                                       _encode(Image.fromarray(mask), "PNG"), histogram))
            expected[f"s{index}"] = (_expected_pixels(array, data, pil_format), mask)
    cfg = DataConfig(val=str(tmp_path), num_classes=NUM_CLASSES, num_workers=0, on_bad_sample="error",
                     verify_checksums=True)
    loader = make_val_loader(cfg, rank=0, world_size=1)
    seen = {}
    for batch in loader:
        seen[batch["key"][0]] = (batch["image"][0].permute(1, 2, 0).numpy(), batch["label"][0].numpy())
    assert sorted(seen) == sorted(expected) and not loader.bad_counts
    for key, (image, mask) in expected.items():
        assert np.array_equal(seen[key][0], image) and np.array_equal(seen[key][1], mask), key

    report = inspect_shards(str(tmp_path))
    assert report.problems == []
    assert (report.sets[0].samples, report.sets[0].shards) == (len(expected), 3)


def test_member_names_split_as_the_reader_splits_them(tmp_path):
    """A dot in a directory name is not the key's end; the extension is compared in lower case."""
    assert stream._MEMBER_NAME is shard_format.MEMBER_NAME
    mask = _mask(1)
    tar_path = _write_tar(tmp_path / "x.tar", [("run.v1/k.PNG", _encode(Image.fromarray(_image(1)), "PNG")),
                                               ("run.v1/k.seg.png", _encode(Image.fromarray(mask), "PNG"))])
    (key, members), = _read(tar_path)
    assert key == "run.v1/k" and sorted(members) == ["png", "seg.png"]
    report = inspect_shards(str(tar_path))
    assert report.problems == [] and (report.sets[0].samples, report.sets[0].masks) == (1, 1)


@pytest.mark.parametrize("mode", shard_format.MASK_MODES + ("I;16", "RGB", "LA"))
def test_mask_modes(tmp_path, mode):
    mask = _mask(2)
    if mode == "P":
        image = Image.frombytes("P", (WIDTH, HEIGHT), mask.tobytes())
        image.putpalette([value for index in range(256) for value in (index, 255 - index, 0)])
    elif mode == "I;16":
        image = Image.fromarray(mask.astype(np.uint16))
    else:
        image = Image.fromarray(mask).convert(mode)
    assert image.mode == mode
    tar_path = _write_tar(tmp_path / "x.tar", [("k.png", _encode(Image.fromarray(_image(2)), "PNG")),
                                               ("k.seg.png", _encode(image, "PNG"))])
    (key, members), = _read(tar_path)
    problems = inspect_shards(str(tar_path)).problems
    if mode in shard_format.MASK_MODES:
        assert np.array_equal(decode_sample(members, "x", key, True, NUM_CLASSES).mask, mask)  # palette indices
        assert problems == []
    else:
        with pytest.raises(BadSample, match="corrupt_mask"):
            decode_sample(members, "x", key, True, NUM_CLASSES)
        assert problems == [f"x.tar:k.seg.png: mask mode {mode}, expected 8-bit single channel (L or P)"]


# ------------------------------------------------------------------------- refused by the reader, flagged

def _member_bytes(extension: str) -> bytes:
    if extension in ("tif", "gif"):  # real images, in formats the reader never decodes
        return _encode(Image.fromarray(_image(3)), {"tif": "TIFF", "gif": "GIF"}[extension])
    if extension == "pyd":
        return pickle.dumps({"payload": 1})
    if extension == "npy":
        buffer = io.BytesIO()
        np.save(buffer, _image(3))
        return buffer.getvalue()
    return json.dumps({"note": "metadata"}).encode()


@pytest.mark.parametrize("extension", ["tif", "gif", "pyd", "npy", "json"])
def test_members_the_reader_ignores_are_flagged(tmp_path, extension):
    assert extension not in shard_format.IMAGE_EXTENSIONS and extension != shard_format.MASK_EXTENSION
    mask_png = _encode(Image.fromarray(_mask(3)), "PNG")
    extra = _member_bytes(extension)
    # beside a good image: the reader decodes the sample and ignores the member unread
    tar_path = _write_tar(tmp_path / "extra.tar", [("k.png", _encode(Image.fromarray(_image(3)), "PNG")),
                                                   ("k.seg.png", mask_png), (f"k.{extension}", extra)])
    (key, members), = _read(tar_path)
    assert decode_sample(members, "x", key, True, NUM_CLASSES).unexpected_members == 1
    assert inspect_shards(str(tar_path)).problems == [f"extra.tar:k: non-image members ['{extension}'] "
                                                      "(never unpickled or decoded)"]
    # as the only image: the reader skips the sample
    tar_path = _write_tar(tmp_path / "only.tar", [(f"k.{extension}", extra), ("k.seg.png", mask_png)])
    (key, members), = _read(tar_path)
    with pytest.raises(BadSample, match="missing_image"):
        decode_sample(members, "x", key, True, NUM_CLASSES)
    assert "only.tar:k: expected one image member, found []" in inspect_shards(str(tar_path)).problems


@pytest.mark.parametrize("pil_format", ["TIFF", "GIF", "PPM", "ICO"])
def test_image_bytes_of_another_format_are_refused_by_both(tmp_path, pil_format):
    """A known extension holding a format outside PIL_FORMATS: neither side runs that decoder."""
    assert pil_format not in shard_format.PIL_FORMATS
    data = _encode(Image.fromarray(_image(4)), pil_format)
    assert Image.open(io.BytesIO(data)).format == pil_format  # PIL itself would decode it
    tar_path = _write_tar(tmp_path / "x.tar", [("k.png", data)])
    (key, members), = _read(tar_path)
    with pytest.raises(BadSample, match="corrupt_image"):
        decode_sample(members, "x", key, False, NUM_CLASSES)
    (problem,) = inspect_shards(str(tar_path)).problems
    assert problem.startswith("x.tar:k.png: corrupt image:")


def test_repeated_members_and_split_samples_are_flagged(tmp_path):
    """The reader groups consecutive members by key and keeps the first of a repeated member; a key that comes
    back later is a second sample. The inspector groups the same way and reports both."""
    first, second = _image(5), _image(6)
    mask_png = _encode(Image.fromarray(_mask(5)), "PNG")
    tar_path = _write_tar(tmp_path / "x.tar", [
        ("a.png", _encode(Image.fromarray(first), "PNG")), ("a.seg.png", mask_png),
        ("a.png", _encode(Image.fromarray(second), "PNG")),
        ("b.png", _encode(Image.fromarray(second), "PNG")), ("b.seg.png", mask_png),
        ("a.jpg", _encode(Image.fromarray(second), "JPEG"))])
    samples = _read(tar_path, {"unexpected_member": 1})  # the second a.png, dropped unread
    assert [key for key, _ in samples] == ["a", "b", "a"]
    assert np.array_equal(decode_sample(samples[0][1], "x", "a", True, NUM_CLASSES).image, first)
    assert inspect_shards(str(tar_path)).problems == ["x.tar:a: repeated member 'png' (the reader keeps the first)",
                                                      "x.tar:a: duplicate key"]


def test_missing_mask_in_a_set_with_masks(tmp_path):
    with ShardSetWriter(tmp_path, "labeled", "toy", NUM_CLASSES) as writer:
        for index in range(2):
            writer.write(encode_sample(f"s{index}", _image(index), _mask(index), num_classes=NUM_CLASSES))
    shard = tmp_path / shard_format.shard_name("labeled", 0)
    with tarfile.open(shard) as tar:
        kept = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "s1.seg.png"]
    _write_tar(shard, kept)
    members = dict(_read(shard))["s1"]
    with pytest.raises(BadSample, match="missing_mask"):
        decode_sample(members, str(shard), "s1", True, NUM_CLASSES)
    assert "labeled-000000.tar:s1: no seg.png member, but the set has masks" in inspect_shards(str(tmp_path)).problems


# ---------------------------------------------------------------------------------------- writer side

def test_writer_output_follows_the_format(tmp_path):
    assert set(shard_format.WRITTEN_IMAGE_EXTENSIONS) <= set(shard_format.IMAGE_EXTENSIONS)
    for split in ("labeled", "unlabeled"):
        with ShardSetWriter(tmp_path / split, split, "toy", NUM_CLASSES) as writer:
            writer.write(encode_sample("k", _image(7), _mask(7) if split == "labeled" else None,
                                       num_classes=NUM_CLASSES))
        manifest = json.loads((tmp_path / split / shard_format.MANIFEST_NAME).read_text())
        extra = shard_format.MASK_MANIFEST_FIELDS if split == "labeled" else ()
        assert sorted(manifest) == sorted(shard_format.MANIFEST_FIELDS + extra)
        assert manifest["format"] == shard_format.FORMAT
        (entry,) = manifest["shards"]
        assert sorted(entry) == sorted(shard_format.SHARD_ENTRY_FIELDS)
        assert entry["name"] == shard_format.shard_name(split, 0) == f"{split}-000000.tar"
    bad = EncodedSample("k", _encode(Image.fromarray(_image(7)), "TIFF"), "tif", HEIGHT, WIDTH)
    with pytest.raises(ShardWriteError, match="'tif' is not one of"):
        with ShardSetWriter(tmp_path / "bad", "unlabeled", "toy") as writer:
            writer.write(bad)


@pytest.mark.parametrize("stem, key", [("img.001", "img_001"), ("a b", "a_b"), ("ok-1_2", "ok-1_2")])
def test_safe_keys_are_valid_keys(stem, key):
    """The folder reader's key of a file stem is one the writer takes; a dot or a space is not."""
    assert shard_format.safe_key(stem) == key and shard_format.is_valid_key(key)
    assert shard_format.is_valid_key(stem) == (stem == key)
