"""ShardSetWriter: shard layout, manifest, size bounds, validation errors, determinism."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2pl_scale.data.inspect_shards import inspect_shards
from u2pl_scale.data.writer import ShardSetWriter, ShardWriteError, encode_sample, parse_size, write_split


def _random_sample(rng: np.random.Generator, key: str, height: int = 12, width: int = 10, num_classes: int = 4):
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, num_classes, size=(height, width)).astype(np.uint8)
    mask[0, :3] = 255
    return image, mask


def _tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]


@pytest.mark.parametrize("text, expected", [("500MB", 500 * 10**6), ("1GB", 10**9), ("64MiB", 64 * 2**20),
                                            ("1.5kb", 1500), ("4096", 4096), (123, 123)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "ten MB", "5XB", "0MB"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_manifest_shards_and_members(tmp_path):
    rng = np.random.default_rng(0)
    samples = {f"s{i:03d}": _random_sample(rng, f"s{i:03d}", height=10 + i, width=20 - i) for i in range(7)}
    with ShardSetWriter(tmp_path, "labeled", "toy", 4, ["a", "b", "c", "d"], max_count=3) as writer:
        for key, (image, mask) in samples.items():
            writer.write(encode_sample(key, image, mask, num_classes=4))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "u2pl-shards/1"
    assert (manifest["dataset"], manifest["split"], manifest["num_samples"]) == ("toy", "labeled", 7)
    assert (manifest["num_classes"], manifest["ignore_index"], manifest["has_masks"]) == (4, 255, True)
    assert manifest["class_names"] == ["a", "b", "c", "d"]
    assert [s["name"] for s in manifest["shards"]] == [f"labeled-00000{i}.tar" for i in range(3)]
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["image_size_range"] == {"min": [10, 14], "max": [16, 20]}
    for shard in manifest["shards"]:
        assert hashlib.sha256((tmp_path / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]

    members = [m for shard in manifest["shards"] for m in _tar_members(tmp_path / shard["name"])]
    assert [name for name, _ in members] == [n for key in samples for n in (f"{key}.png", f"{key}.seg.png")]
    expected_histogram = np.zeros(4, dtype=np.int64)
    for (name, data), (image, mask) in zip(members[::2], samples.values()):
        assert np.array_equal(np.array(Image.open(io.BytesIO(data))), image)
    for (name, data), (image, mask) in zip(members[1::2], samples.values()):
        decoded = Image.open(io.BytesIO(data))
        assert decoded.mode == "L"
        assert np.array_equal(np.array(decoded), mask)
        for class_id in range(4):
            expected_histogram[class_id] += int((mask == class_id).sum())
    assert manifest["class_pixel_histogram"] == expected_histogram.tolist()
    with tarfile.open(tmp_path / "labeled-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()} == {(0, 0, 0, "", "")}


def test_max_bytes_bounds_shards(tmp_path):
    rng = np.random.default_rng(1)
    with ShardSetWriter(tmp_path, "unlabeled", "toy", max_bytes="45KB") as writer:
        for i in range(10):
            # Incompressible 12.4 KB PNGs take 13312 tar bytes each: three fit in 45 KB, four do not.
            writer.write(encode_sample(f"u{i}", rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)))
    manifest = writer.manifest
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 3, 1]
    for shard in manifest["shards"]:
        assert (tmp_path / shard["name"]).stat().st_size <= 45_000 + 10240  # tar pads to its 10 KiB record
    assert "class_pixel_histogram" not in manifest and manifest["has_masks"] is False


def test_mismatched_mask_names_the_key(tmp_path):
    image = np.zeros((8, 9, 3), dtype=np.uint8)
    with pytest.raises(ShardWriteError, match=r"'img_7'.*\(8, 8\).*\(8, 9\)"):
        encode_sample("img_7", image, np.zeros((8, 8), dtype=np.uint8), num_classes=3)


def test_out_of_range_labels_name_key_and_values():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0], mask[1, 1], mask[2, 2] = 3, 7, 255  # 255 is ignore and therefore fine
    with pytest.raises(ShardWriteError, match=r"'frame_2' \(a/b.png\).*2 pixels.*\[3, 7\]"):
        encode_sample("frame_2", image, mask, num_classes=3, source="a/b.png")


def test_corrupt_image_names_source():
    with pytest.raises(ShardWriteError, match=r"'x1' \(dir/x1.jpg\): cannot decode"):
        encode_sample("x1", b"\xff\xd8\xff\xe0 not really a jpeg", source="dir/x1.jpg")


def test_key_with_dot_is_refused():
    with pytest.raises(ShardWriteError, match="key"):
        encode_sample("img.001", np.zeros((2, 2, 3), dtype=np.uint8))


def test_split_mask_rules(tmp_path):
    image, mask = _random_sample(np.random.default_rng(2), "k")
    labeled_sample = encode_sample("k", image, mask, num_classes=4)
    with pytest.raises(ShardWriteError, match="must not contain masks"):
        with ShardSetWriter(tmp_path / "u", "unlabeled", "toy") as writer:
            writer.write(labeled_sample)
    assert not (tmp_path / "u" / "manifest.json").exists()
    assert list((tmp_path / "u").iterdir()) == []  # the unfinished shard was removed
    with pytest.raises(ShardWriteError, match="needs a mask"):
        with ShardSetWriter(tmp_path / "l", "labeled", "toy", 4) as writer:
            writer.write(labeled_sample.without_mask())
    with pytest.raises(ShardWriteError, match="duplicate"):
        with ShardSetWriter(tmp_path / "v", "val", "toy", 4) as writer:
            writer.write(labeled_sample)
            writer.write(labeled_sample)


def test_jpeg_bytes_pass_through_and_gray_becomes_rgb():
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (10, 200, 30)).save(buffer, format="JPEG")
    sample = encode_sample("j", buffer.getvalue())
    assert (sample.image, sample.image_ext, sample.height, sample.width) == (buffer.getvalue(), "jpg", 5, 6)
    buffer = io.BytesIO()
    Image.new("L", (6, 5), 77).save(buffer, format="JPEG")
    gray = encode_sample("g", buffer.getvalue())
    assert gray.image_ext == "jpg" and Image.open(io.BytesIO(gray.image)).mode == "RGB"


def _toy_loader(key, seed):
    image, mask = _random_sample(np.random.default_rng(seed), key)
    return encode_sample(key, image, mask, num_classes=4)


def test_write_split_is_deterministic_across_workers_and_rewrites(tmp_path):
    records = [(f"k{i:02d}", i) for i in reversed(range(20))]  # unsorted on purpose
    first = write_split(tmp_path / "a", "val", "toy", records, _toy_loader, 4, max_count=6, progress=False)
    second = write_split(tmp_path / "b", "val", "toy", records, _toy_loader, 4, workers=2, max_count=6,
                         progress=False)
    assert first["shards"] == second["shards"]
    assert first["num_samples"] == 20 and len(first["shards"]) == 4
    names = [name for name, _ in _tar_members(tmp_path / "a" / "val-000000.tar")]
    assert names[0] == "k00.png" and names[-1] == "k05.seg.png"
    # Rewriting with bigger shards removes the stale ones of the earlier run.
    write_split(tmp_path / "a", "val", "toy", records, _toy_loader, 4, max_count=50, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json", "val-000000.tar"]


def _raw_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_inspect_clean_set_and_bad_samples(tmp_path):
    records = [(f"k{i:02d}", i) for i in range(5)]
    write_split(tmp_path / "good", "val", "toy", records, _toy_loader, 4, progress=False)
    report = inspect_shards(str(tmp_path / "good"))
    assert report.problems == []
    (good,) = report.sets
    assert (good.samples, good.masks, good.shards, good.min_size) == (5, 5, 1, [12, 10])
    assert good.histogram[:4].tolist() == json.loads((tmp_path / "good" / "manifest.json").read_text())[
        "class_pixel_histogram"]

    image = np.zeros((4, 5, 3), dtype=np.uint8)
    out_of_range = np.full((4, 5), 7, dtype=np.uint8)
    (tmp_path / "bad").mkdir()
    _raw_tar(tmp_path / "bad" / "x.tar", [
        ("ok.png", _png(image)), ("ok.seg.png", _png(np.zeros((4, 5), dtype=np.uint8))),
        ("broken.jpg", b"\xff\xd8 truncated"),
        ("shape.png", _png(image)), ("shape.seg.png", _png(np.zeros((4, 4), dtype=np.uint8))),
        ("labels.png", _png(image)), ("labels.seg.png", _png(out_of_range)),
        ("payload.png", _png(image)), ("payload.pyd", b"\x80\x04 pickle bytes, never loaded"),
    ])
    bad = inspect_shards(str(tmp_path / "bad" / "*.tar"))
    problems = "\n".join(bad.problems)
    assert "broken.jpg: corrupt image" in problems
    assert "x.tar:shape: mask shape [4, 4] differs from image shape [4, 5]" in problems
    assert "x.tar:payload: non-image members ['pyd']" in problems
    assert "labels" not in problems  # without a manifest the class count is unknown
    assert bad.sets[0].histogram[7] == 20

    # With the manifest of the good set: out-of-range labels and a tampered shard are caught.
    shard = tmp_path / "good" / "val-000000.tar"
    _raw_tar(shard, [("k00.png", _png(image)), ("k00.seg.png", _png(out_of_range))])
    tampered = "\n".join(inspect_shards(str(tmp_path / "good")).problems)
    assert "k00: labels [7] outside [0, 4)" in tampered
    assert "sha256 differs" in tampered and "1 good samples, manifest says 5" in tampered
    assert "class_pixel_histogram in manifest.json differs" in tampered


def test_webdataset_reads_the_shards_as_samples(tmp_path):
    import webdataset

    records = [(f"k{i:02d}", i) for i in range(5)]
    manifest = write_split(tmp_path, "labeled", "toy", records, _toy_loader, 4, max_count=2, progress=False)
    urls = [str(tmp_path / shard["name"]) for shard in manifest["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [key for key, _ in records]
    assert all({"png", "seg.png"} <= set(s) for s in samples)
    expected_mask = _random_sample(np.random.default_rng(3), "k03")[1]
    assert np.array_equal(np.array(Image.open(io.BytesIO(samples[3]["seg.png"]))), expected_mask)


def _marking_loader(key, marks_dir):
    """A picklable loader: 50 ms per sample, leaves a file per encoded sample in marks_dir; sample 'a' is bad."""
    import time

    time.sleep(0.05)
    if key == "a":
        raise ShardWriteError(f"sample {key!r}: bad")
    (Path(marks_dir) / key).touch()
    return key


def test_a_bad_sample_or_an_early_stop_winds_the_worker_pool_down(tmp_path):
    """A worker's error reaches the caller, and the pool winds down without killing a worker (a
    multiprocessing.Pool could hang in terminate() here): the samples not yet started are cancelled, so far fewer
    than the 400 after the bad one get encoded; likewise when the caller stops reading early."""
    from u2pl_scale.data.writer import encode_samples

    for case in ("error", "early stop"):
        marks = tmp_path / case.replace(" ", "_")
        marks.mkdir()
        records = [("a", str(marks))] * (case == "error") + [(f"c{i:03d}", str(marks)) for i in range(400)]
        samples = encode_samples(records, _marking_loader, workers=2, progress=False)
        if case == "error":
            with pytest.raises(ShardWriteError, match="sample 'a': bad"):
                next(samples)
        else:
            assert next(samples) == "c000"
            samples.close()
        encoded = len(list(marks.iterdir()))
        assert encoded < 300, (case, encoded)  # chunks of 25: the running and queued ones finish, no more
