"""Shard reading on real tar shards: resolution, node/worker splitting, exact step counts, resume, val coverage,
and every hostile input (corrupt, pickled, mismatched, out of range, missing, not a tar)."""
from __future__ import annotations

import collections
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from u2pl_scale.config import DataConfig
from u2pl_scale.data.decode import BAD_REASONS, BadSample, decode_sample
from u2pl_scale.data.stream import (iter_share, make_train_loader, make_val_loader, resolve_shards, shuffle_buffer,
                                    unlabeled_size, worker_share)

NUM_CLASSES = 3
CROP = 16


# ------------------------------------------------------------------------------------------------ helpers

def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _good_members(index: int, with_mask: bool = True, height: int = 12, width: int = 20) -> dict:
    rng = np.random.default_rng(index)
    members = {"jpg": _jpeg(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))}
    if with_mask:
        mask = rng.integers(0, NUM_CLASSES, (height, width)).astype(np.uint8)
        mask[0, 0] = 255
        members["seg.png"] = _png(mask)
    return members


def _write_tar(path: Path, samples: list) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_set(directory: Path, split: str, shards: list, with_mask: bool = True) -> Path:
    """shards: per shard a list of (key, members). Writes the tars and the manifest; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, samples in enumerate(shards):
        name = f"{split}-{index:06d}.tar"
        _write_tar(directory / name, samples)
        entries.append({"name": name, "num_samples": len(samples), "sha256": ""})
    manifest = {"format": "u2pl-shards/1", "dataset": "toy", "split": split,
                "num_samples": sum(len(s) for s in shards), "num_classes": NUM_CLASSES if with_mask else None,
                "ignore_index": 255, "has_masks": with_mask, "shards": entries}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _uniform_set(directory: Path, split: str, sizes: list, with_mask: bool = True) -> Path:
    """Shards of the given sizes; keys are unique over the set."""
    shards, index = [], 0
    for size in sizes:
        shards.append([(f"s{index + i:04d}", _good_members(index + i, with_mask)) for i in range(size)])
        index += size
    return _write_set(directory, split, shards, with_mask)


def _cfg(**overrides) -> DataConfig:
    settings = dict(num_classes=NUM_CLASSES, crop_size=CROP, num_workers=0, shuffle_buffer=4, on_bad_sample="skip")
    settings.update(overrides)
    return DataConfig(**settings)


def _all_keys(directory: Path) -> set:
    keys = set()
    for tar_path in directory.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            keys.update(name.split(".", 1)[0] for name in tar.getnames())
    return keys


class _Marker:
    """Unpickling this creates a file: proof that a pickle member was (or was not) deserialised."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


# ------------------------------------------------------------------------------------------- resolution

def test_resolve_directory_manifest_pattern_list_and_remote(tmp_path):
    directory = _uniform_set(tmp_path / "lab", "labeled", [3, 2])
    urls, count = resolve_shards(str(directory))
    assert [Path(u).name for u in urls] == ["labeled-000000.tar", "labeled-000001.tar"] and count == 5
    assert resolve_shards(directory / "manifest.json") == (urls, 5)
    pattern = str(directory / "labeled-{000000..000001}.tar")
    assert resolve_shards(pattern) == (urls, None)
    assert resolve_shards([str(directory), pattern]) == (urls + urls, None)
    assert resolve_shards([str(directory), str(directory)]) == (urls + urls, 10)
    assert resolve_shards("pipe:cat /x/a-{0..2}.tar") == ([f"pipe:cat /x/a-{i}.tar" for i in range(3)], None)
    assert resolve_shards("s3://bucket/u-{00..01}.tar") == (["s3://bucket/u-00.tar", "s3://bucket/u-01.tar"], None)
    assert unlabeled_size(str(directory)) == 5 and unlabeled_size(pattern) is None


def test_resolve_missing_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="x-000002.tar"):
        resolve_shards(str(tmp_path / "x-{000002..000003}.tar"))
    directory = _uniform_set(tmp_path / "lab", "labeled", [2, 2])
    (directory / "labeled-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="labeled-000001.tar"):
        resolve_shards(str(directory))


def test_manifest_contradicting_config_fails_early(tmp_path):
    unlabeled = _uniform_set(tmp_path / "unl", "unlabeled", [2], with_mask=False)
    with pytest.raises(ValueError, match="has_masks"):
        make_train_loader(_cfg(labeled=str(unlabeled)), "labeled", 2, 0, 1, 0, 0, steps=1)
    labeled = _uniform_set(tmp_path / "lab", "labeled", [2])
    with pytest.raises(ValueError, match="num_classes"):
        make_train_loader(_cfg(labeled=str(labeled), num_classes=5), "labeled", 2, 0, 1, 0, 0, steps=1)


# ------------------------------------------------------------------------------------- splitting a pass

@pytest.mark.parametrize("num_shards, world_size, workers", [(7, 2, 2), (3, 2, 2), (1, 1, 2), (8, 2, 2)])
def test_one_pass_covers_every_sample_once(tmp_path, num_shards, world_size, workers):
    directory = _uniform_set(tmp_path / "set", "unlabeled", [3 + i % 3 for i in range(num_shards)], with_mask=False)
    urls, total = resolve_shards(str(directory))
    global_workers = world_size * workers
    for cycle in range(2):
        seen, shards_read = [], []
        for rank in range(world_size):
            for worker in range(workers):
                share = worker_share(urls, seed=5, epoch=1, cycle=cycle, global_worker=rank * workers + worker,
                                     global_workers=global_workers)
                shards_read += share.urls
                seen += [key for _, key, _ in iter_share(share, "skip", collections.Counter())]
        assert sorted(seen) == sorted(_all_keys(directory)) and len(seen) == total  # no duplicates, none missing
        if num_shards >= global_workers:  # whole shards: each read by exactly one worker
            assert sorted(shards_read) == sorted(urls)


def test_shard_order_changes_with_epoch_and_pass():
    urls = [f"s{i}.tar" for i in range(10)]
    orders = {tuple(worker_share(urls, 0, epoch, cycle, 0, 1).urls) for epoch in range(2) for cycle in range(2)}
    assert len(orders) == 4
    assert worker_share(urls, 0, 1, 1, 0, 1) == worker_share(urls, 0, 1, 1, 0, 1)


# ------------------------------------------------------------------------------------------ train streams

def test_exact_step_count_shapes_and_padding(tmp_path):
    labeled = _uniform_set(tmp_path / "lab", "labeled", [3, 2])
    cfg = _cfg(labeled=str(labeled), crop_size=24)  # larger than the 12x20 images at scale < 2: padding happens
    stream = make_train_loader(cfg, "labeled", batch_size=2, rank=0, world_size=1, seed=0, epoch=0, steps=7,
                               start_step=2)
    batches = list(stream)
    assert len(stream) == 5 and len(batches) == 5  # more samples than the set holds: the stream cycles
    for batch in batches:
        assert batch["image"].shape == (2, 3, 24, 24) and batch["image"].dtype == torch.uint8
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        assert batch["label"].shape == (2, 24, 24) and batch["label"].dtype == torch.uint8
        assert batch["valid"].shape == (2, 24, 24) and batch["valid"].dtype == torch.bool
        assert len(batch["key"]) == 2 and set(batch["bad"]) == set(BAD_REASONS)
        assert (batch["label"][~batch["valid"]] == 255).all()
        assert ((batch["label"][batch["valid"]] < NUM_CLASSES) | (batch["label"][batch["valid"]] == 255)).all()
    assert any((~b["valid"]).any() for b in batches)


def test_unlabeled_batches_have_no_label(tmp_path):
    unlabeled = _uniform_set(tmp_path / "unl", "unlabeled", [4], with_mask=False)
    batches = list(make_train_loader(_cfg(unlabeled=str(unlabeled)), "unlabeled", 3, 0, 1, 0, 0, steps=2))
    assert len(batches) == 2 and all("label" not in b and b["valid"].shape == (3, CROP, CROP) for b in batches)


def test_odd_shards_two_ranks_two_workers_same_batch_count(tmp_path):
    labeled = _uniform_set(tmp_path / "lab", "labeled", [5, 1, 3])  # 3 uneven shards for 4 global workers
    cfg = _cfg(labeled=str(labeled), num_workers=2)
    keys = _all_keys(labeled)
    per_rank = []
    for rank in range(2):
        batches = list(make_train_loader(cfg, "labeled", 2, rank, 2, seed=3, epoch=0, steps=6))
        per_rank.append(len(batches))
        assert all(set(b["key"]) <= keys for b in batches)
        assert all(b["image"].is_contiguous(memory_format=torch.channels_last) for b in batches)  # through IPC
    assert per_rank == [6, 6]


def test_stream_is_deterministic_and_resume_is_its_tail(tmp_path):
    labeled = _uniform_set(tmp_path / "lab", "labeled", [4, 3, 5, 2, 4])
    cfg = _cfg(labeled=str(labeled), num_workers=2)

    def run(start_step, seed=1, epoch=2):
        return list(make_train_loader(cfg, "labeled", 2, 0, 2, seed, epoch, steps=8, start_step=start_step))

    full, again, resumed = run(0), run(0), run(3)
    assert [b["key"] for b in full] == [b["key"] for b in again]
    assert all((a["image"] == b["image"]).all() and (a["label"] == b["label"]).all() for a, b in zip(full, again))
    assert len(resumed) == 5
    for a, b in zip(full[3:], resumed):
        assert a["key"] == b["key"] and (a["image"] == b["image"]).all() and (a["valid"] == b["valid"]).all()
    assert [b["key"] for b in run(0, epoch=3)] != [b["key"] for b in full]


# ------------------------------------------------------------------------------------------ val streams

def test_val_two_ranks_two_workers_cover_each_sample_once(tmp_path):
    val = _uniform_set(tmp_path / "val", "val", [3, 4, 2])
    cfg = _cfg(val=str(val), num_workers=2)
    seen = []
    for rank in range(2):
        for batch in make_val_loader(cfg, rank, 2):
            assert batch["image"].shape == (1, 3, 12, 20) and batch["label"].shape == (1, 12, 20)
            assert batch["image"].dtype == batch["label"].dtype == torch.uint8
            seen += batch["key"]
    assert sorted(seen) == sorted(_all_keys(val))
    manifest_order = [f"s{i:04d}" for i in range(9)]
    rank0 = [b["key"][0] for b in make_val_loader(_cfg(val=str(val)), 0, 2)]
    assert rank0 == manifest_order[0::2]  # sample i on rank i % world_size, in manifest order


# ------------------------------------------------------------------------------------------- bad input

def _out_of_range_members() -> dict:
    members = _good_members(103)
    members["seg.png"] = _png(np.full((12, 20), 7, dtype=np.uint8))  # class 7 with 3 classes
    return members


def _hostile_set(tmp_path: Path) -> tuple:
    """A val-style set: 4 good samples, one of each bad kind, a pickle member on a good sample, a not-a-tar shard.
    Returns (directory, good keys, marker path)."""
    marker = tmp_path / "unpickled.marker"
    truncated = _good_members(100)
    truncated["jpg"] = truncated["jpg"][: len(truncated["jpg"]) // 2]
    with_pickle = _good_members(101)
    with_pickle["pyd"] = pickle.dumps(_Marker(str(marker)))
    with_pickle["pickle"] = pickle.dumps(_Marker(str(marker)))
    mismatch = _good_members(102)
    mismatch["seg.png"] = _png(np.zeros((5, 5), dtype=np.uint8))
    out_of_range = _out_of_range_members()
    missing_mask = _good_members(104)
    del missing_mask["seg.png"]
    shards = [
        [("good0", _good_members(0)), ("truncated", truncated), ("pickled", with_pickle)],
        [("mismatch", mismatch), ("good1", _good_members(1)), ("outofrange", out_of_range)],
        [("nomask", missing_mask), ("good2", _good_members(2)), ("good3", _good_members(3))],
    ]
    directory = _write_set(tmp_path / "hostile", "val", shards)
    (directory / "val-000003.tar").write_bytes(b"this is not a tar file" * 50)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"].append({"name": "val-000003.tar", "num_samples": 1, "sha256": ""})
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory, {"good0", "pickled", "good1", "good2", "good3"}, marker


EXPECTED_BAD = {"corrupt_image": 1, "mask_size_mismatch": 1, "label_out_of_range": 1, "missing_mask": 1,
                "bad_shard": 1, "unexpected_member": 2}


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2)])
def test_val_skips_and_counts_each_bad_kind_exactly_once(tmp_path, world_size, workers):
    directory, good_keys, marker = _hostile_set(tmp_path)
    cfg = _cfg(val=str(directory), num_workers=workers)
    seen, from_batches, totals = [], collections.Counter(), collections.Counter()
    for rank in range(world_size):
        stream = make_val_loader(cfg, rank, world_size)
        for batch in stream:
            seen += batch["key"]
            from_batches.update(batch["bad"])
        totals.update(stream.bad_counts)
    assert sorted(seen) == sorted(good_keys)
    assert {k: v for k, v in totals.items() if v} == EXPECTED_BAD
    assert all(from_batches[k] <= v for k, v in EXPECTED_BAD.items())  # the rest came in counts-only records
    assert not marker.exists()  # the pickle members were never deserialised


def test_train_skips_bad_samples_and_counts_them_in_batches(tmp_path):
    directory, good_keys, marker = _hostile_set(tmp_path)
    cfg = _cfg(labeled=str(directory), num_workers=2)
    stream = make_train_loader(cfg, "labeled", 2, 0, 1, seed=0, epoch=0, steps=12)
    batches = list(stream)
    from_batches = collections.Counter()
    for batch in batches:
        assert set(batch["key"]) <= good_keys
        from_batches.update(batch["bad"])
    assert len(batches) == 12
    assert all(from_batches[reason] > 0 for reason in EXPECTED_BAD)
    assert {k: v for k, v in from_batches.items() if v} == {k: v for k, v in stream.bad_counts.items() if v}
    assert not marker.exists()


@pytest.mark.parametrize("shard_name, bad_key, reason", [
    ("val-000000.tar", "truncated", "corrupt_image"), ("val-000001.tar", "mismatch", "mask_size_mismatch"),
    ("val-000001.tar", "outofrange", "label_out_of_range"), ("val-000002.tar", "nomask", "missing_mask")])
def test_error_mode_names_shard_and_key(tmp_path, shard_name, bad_key, reason):
    directory, _, _ = _hostile_set(tmp_path)
    shard = str(directory / shard_name)
    if bad_key == "outofrange":  # the mismatch sample comes first in that shard; take it out of the way
        shard_samples = [("good1", _good_members(1)), ("outofrange", _out_of_range_members())]
        _write_tar(Path(shard), shard_samples)
    cfg = _cfg(val=shard, on_bad_sample="error")
    with pytest.raises(BadSample, match=reason) as info:
        list(make_val_loader(cfg, 0, 1))
    assert shard in str(info.value) and repr(bad_key) in str(info.value)


def test_error_mode_in_worker_process_names_shard_and_key(tmp_path):
    directory, _, _ = _hostile_set(tmp_path)
    cfg = _cfg(labeled=str(directory / "val-000000.tar"), on_bad_sample="error", num_workers=1)
    with pytest.raises(Exception, match="corrupt_image") as info:
        list(make_train_loader(cfg, "labeled", 2, 0, 1, 0, 0, steps=3))
    assert "val-000000.tar" in str(info.value) and "'truncated'" in str(info.value)


def test_not_a_tar_shard(tmp_path):
    directory, _, _ = _hostile_set(tmp_path)
    not_a_tar = str(directory / "val-000003.tar")
    with pytest.raises(BadSample, match="bad_shard") as info:
        list(make_val_loader(_cfg(val=not_a_tar, on_bad_sample="error"), 0, 1))
    assert not_a_tar in str(info.value)
    stream = make_val_loader(_cfg(val=[not_a_tar, str(directory / "val-000002.tar")]), 0, 1)
    assert [b["key"][0] for b in stream] == ["good2", "good3"]
    assert stream.bad_counts["bad_shard"] == 1 and stream.bad_counts["missing_mask"] == 1


def test_all_bad_train_stream_raises_instead_of_hanging(tmp_path):
    directory, _, _ = _hostile_set(tmp_path)
    cfg = _cfg(labeled=str(directory / "val-000003.tar"))  # the not-a-tar shard alone
    with pytest.raises(RuntimeError, match="no samples"):
        list(make_train_loader(cfg, "labeled", 2, 0, 1, 0, 0, steps=1))
    truncated = _good_members(200)
    truncated["jpg"] = truncated["jpg"][:40]
    only_bad = _write_set(tmp_path / "bad", "labeled", [[("t", truncated)]])
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(make_train_loader(_cfg(labeled=str(only_bad)), "labeled", 2, 0, 1, 0, 0, steps=1))


def test_shuffle_buffer_keeps_every_item_and_zero_capacity_keeps_order():
    rng = np.random.default_rng(0)
    shuffled = list(shuffle_buffer(range(50), 8, rng))
    assert sorted(shuffled) == list(range(50)) and shuffled != list(range(50))
    assert list(shuffle_buffer(range(5), 0, rng)) == list(range(5))


def test_decode_only_allowed_image_formats_and_8bit_masks():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(BadSample, match="corrupt_image"):  # never handed to an EPS (Ghostscript) decoder
        decode_sample({"jpg": eps}, "s.tar", "k", with_mask=False, num_classes=NUM_CLASSES)
    grey = _png(np.full((4, 5), 9, dtype=np.uint8))
    decoded = decode_sample({"png": grey, "npy": b"\x93NUMPY", "seg.png": grey}, "s.tar", "k", with_mask=False,
                            num_classes=NUM_CLASSES)
    assert decoded.image.shape == (4, 5, 3) and (decoded.image == 9).all() and decoded.mask is None
    assert decoded.unexpected_members == 1  # the .npy; an unlabeled sample's mask is ignored, not unexpected
    rgb_mask = _png(np.zeros((4, 5, 3), dtype=np.uint8))
    with pytest.raises(BadSample, match="corrupt_mask.*8-bit"):
        decode_sample({"png": grey, "seg.png": rgb_mask}, "s.tar", "k", with_mask=True, num_classes=NUM_CLASSES)
