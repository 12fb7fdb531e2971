"""Real-dataset shard builders on tiny fake VOC / Cityscapes / COCO / folder trees with the real layouts and
label encodings; expectations are written by hand (or by slow reference code in this file)."""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2pl_scale.data import datasets
from u2pl_scale.data.datasets import DatasetError
from u2pl_scale.data.writer import ShardWriteError
from shard_helpers import read_set

REPO_ROOT = Path(__file__).resolve().parents[2]


def _save_image(path: Path, height: int, width: int, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)


def _save_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette:  # VOC-style: palette index = class id, with a colour palette like the real files
        image = image.convert("P")
        colours = np.random.default_rng(0).integers(0, 256, size=(256, 3), dtype=np.uint8)
        image.putpalette(colours.ravel().tolist())
        image.putdata(mask.ravel().tolist())
    image.save(path)


def _decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def _manifest(set_dir: Path) -> dict:
    return json.loads((set_dir / "manifest.json").read_text())


# ---------------------------------------------------------------- VOC


@pytest.fixture
def voc_root(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for seed, image_id in enumerate(["a", "b", "c", "d", "e", "v1", "v2"]):
        _save_image(root / "JPEGImages" / f"{image_id}.jpg", 6, 8, seed)
    for seed, image_id in enumerate(["a", "b", "c", "d", "e", "v1"]):  # real aug dirs also hold val masks
        mask = np.full((6, 8), seed, dtype=np.uint8)
        mask[0] = 255
        _save_mask(root / "SegmentationClassAug" / f"{image_id}.png", mask)
    val_mask = np.zeros((6, 8), dtype=np.uint8)
    val_mask[2:4, 2:6] = 15  # person
    val_mask[1, 1:7] = 255  # VOC's object border
    _save_mask(root / "SegmentationClass" / "v1.png", val_mask, palette=True)
    _save_mask(root / "SegmentationClass" / "v2.png", np.full((6, 8), 20, dtype=np.uint8), palette=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("v1\nv2\n")
    (sets / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n"
                                                for i in "abcde"))
    (tmp_path / "labeled.txt").write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\nb\n")
    return root


def test_voc_splits_masks_and_passthrough(voc_root, tmp_path):
    source = datasets.voc_source(voc_root, tmp_path / "labeled.txt")
    manifests = datasets.build_dataset(source, tmp_path / "out", progress=False)
    assert {split: m["num_samples"] for split, m in manifests.items()} == {"labeled": 2, "unlabeled": 3, "val": 2}
    assert manifests["val"]["num_classes"] == 21 and manifests["val"]["class_names"][15] == "person"

    labeled = read_set(tmp_path / "out" / "labeled")
    assert sorted(labeled) == ["a", "b"]
    assert labeled["a"]["jpg"] == (voc_root / "JPEGImages" / "a.jpg").read_bytes()  # no re-encoding
    expected_b = np.full((6, 8), 1, dtype=np.uint8)
    expected_b[0] = 255
    assert np.array_equal(_decode(labeled["b"]["seg.png"]), expected_b)

    unlabeled = read_set(tmp_path / "out" / "unlabeled")
    assert sorted(unlabeled) == ["c", "d", "e"] and all(set(m) == {"jpg"} for m in unlabeled.values())

    val = read_set(tmp_path / "out" / "val")
    v1 = _decode(val["v1"]["seg.png"])
    assert v1[2, 3] == 15 and v1[1, 3] == 255 and v1[0, 0] == 0 and v1.dtype == np.uint8
    assert np.array_equal(_decode(val["v2"]["seg.png"]), np.full((6, 8), 20))
    histogram = [0] * 21
    histogram[0], histogram[15], histogram[20] = 48 - 8 - 6, 8, 48
    assert manifests["val"]["class_pixel_histogram"] == histogram


def test_voc_unlabeled_without_train_aug_excludes_val(voc_root, tmp_path):
    (voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    source = datasets.voc_source(voc_root, tmp_path / "labeled.txt", splits=("unlabeled",))
    assert [key for key, _ in source.splits["unlabeled"]] == ["c", "d", "e"]  # v1 has an aug mask but is val


def test_voc_labeled_val_overlap_is_refused(voc_root, tmp_path):
    (tmp_path / "bad.txt").write_text("a\nv1\n")
    with pytest.raises(DatasetError, match="v1"):
        datasets.voc_source(voc_root, tmp_path / "bad.txt")


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    train_ids = ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000100"]
    for seed, image_id in enumerate(train_ids):
        city = image_id.split("_")[0]
        _save_image(root / "leftImg8bit" / "train" / city / f"{image_id}_leftImg8bit.png", 2, 4, seed)
        _save_mask(root / "gtFine" / "train" / city / f"{image_id}_gtFine_labelIds.png",
                   np.array([[0, 7, 26, 33], [24, 6, 11, 1]]))
    _save_image(root / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png", 2, 4, 9)
    _save_mask(root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png",
               np.array([[8, 8, 23, 23], [32, 31, 3, 34]]))
    (tmp_path / "labeled.txt").write_text(
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png\n")

    source = datasets.cityscapes_source(root, tmp_path / "labeled.txt")
    manifests = datasets.build_dataset(source, tmp_path / "out", workers=2, progress=False)
    assert {split: m["num_samples"] for split, m in manifests.items()} == {"labeled": 1, "unlabeled": 2, "val": 1}
    labeled = read_set(tmp_path / "out" / "labeled")
    # label id 0 (unlabeled) -> 255, 7 road -> 0, 26 car -> 13, 33 bicycle -> 18, 24 person -> 11,
    # 6 ground -> 255, 11 building -> 2, 1 ego vehicle -> 255
    assert np.array_equal(_decode(labeled["aachen_000000_000019"]["seg.png"]),
                          [[255, 0, 13, 18], [11, 255, 2, 255]])
    assert labeled["aachen_000000_000019"]["png"] == (
        root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png").read_bytes()
    assert sorted(read_set(tmp_path / "out" / "unlabeled")) == ["aachen_000001_000019", "bochum_000000_000100"]
    val = read_set(tmp_path / "out" / "val")
    assert np.array_equal(_decode(val["frankfurt_000000_000294"]["seg.png"]), [[1, 1, 10, 10], [17, 16, 255, 255]])
    assert manifests["val"]["num_classes"] == 19 and manifests["val"]["class_names"][13] == "car"


# ---------------------------------------------------------------- COCO


def _reference_rle_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a 0-run, as COCO stores them (slow reference)."""
    counts, current, run = [], 0, 0
    for value in mask.T.ravel():
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def _reference_rle_string(counts: list[int]) -> str:
    """pycocotools rleToString, written out again for the test."""
    chars = []
    for index, value in enumerate(counts):
        if index > 2:
            value -= counts[index - 2]
        more = True
        while more:
            char = value & 0x1F
            value >>= 5
            more = (value != -1) if char & 0x10 else (value != 0)
            if more:
                char |= 0x20
            chars.append(chr(char + 48))
    return "".join(chars)


def _coco_tree(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    height, width = 10, 12
    for name, seed, mode in [("000000000001", 1, "RGB"), ("000000000002", 2, "L"), ("000000000003", 3, "RGB")]:
        _save_image(root / "train2017" / f"{name}.jpg", height, width, seed, mode)
    _save_image(root / "val2017" / "000000000010.jpg", height, width, 10)
    _save_image(root / "unlabeled2017" / "000000100000.jpg", height, width, 11)
    toothbrush = np.zeros((height, width), dtype=np.uint8)
    toothbrush[7:9, 0:4] = 1
    crowd = np.zeros((height, width), dtype=np.uint8)
    crowd[4:10, 5:12] = 1
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]

    def image(image_id, name):
        return {"id": image_id, "file_name": f"{name}.jpg", "height": height, "width": width}

    train = {"categories": categories,
             "images": [image(1, "000000000001"), image(2, "000000000002"), image(3, "000000000003")],
             "annotations": [
                 {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 16.0,
                  "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
                 {"id": 2, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 8.0,
                  "segmentation": {"size": [height, width],
                                   "counts": _reference_rle_string(_reference_rle_counts(toothbrush))}},
                 {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 42.0,
                  "segmentation": {"size": [height, width], "counts": _reference_rle_counts(crowd)}},
                 {"id": 4, "image_id": 3, "category_id": 1, "iscrowd": 0, "area": 1.0,
                  "segmentation": [[0, 0, 1, 0, 1, 1, 0, 1]]}]}
    val = {"categories": categories, "images": [image(10, "000000000010")],
           "annotations": [{"id": 5, "image_id": 10, "category_id": 90, "iscrowd": 0, "area": 4.0,
                            "segmentation": [[10, 8, 12, 8, 12, 10, 10, 10]]}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    (tmp_path / "labeled.txt").write_text("train2017/000000000001.jpg\n2\n")  # a file name and a numeric id
    return root


def test_coco_rasterises_polygon_rle_and_crowd(tmp_path):
    root = _coco_tree(tmp_path)
    source = datasets.coco_source(root, tmp_path / "labeled.txt", unlabeled_dir="unlabeled2017")
    manifests = datasets.build_dataset(source, tmp_path / "out", progress=False)
    assert {split: m["num_samples"] for split, m in manifests.items()} == {"labeled": 2, "unlabeled": 2, "val": 1}
    # categories sorted by id: person (1) -> 1, car (3) -> 2, toothbrush (90) -> 3
    assert manifests["labeled"]["class_names"] == ["background", "person", "car", "toothbrush"]

    labeled = read_set(tmp_path / "out" / "labeled")
    expected = np.zeros((10, 12), dtype=np.uint8)
    expected[4:10, 5:12] = 255  # crowd, where no single object lies
    expected[2:6, 2:6] = 2  # polygon square (2,2)-(6,6): pixels 2..5, its area of 16
    expected[7:9, 0:4] = 3  # compressed RLE
    assert np.array_equal(_decode(labeled["000000000001"]["seg.png"]), expected)
    gray = labeled["000000000002"]
    assert np.array_equal(_decode(gray["seg.png"]), np.zeros((10, 12)))  # no annotations: all background
    assert _decode(gray["jpg"]).shape == (10, 12, 3)  # grayscale JPEG stored as RGB

    assert sorted(read_set(tmp_path / "out" / "unlabeled")) == ["000000000003", "000000100000"]
    val_mask = _decode(read_set(tmp_path / "out" / "val")["000000000010"]["seg.png"])
    expected_val = np.zeros((10, 12), dtype=np.uint8)
    expected_val[8:10, 10:12] = 3
    assert np.array_equal(val_mask, expected_val)


@pytest.mark.parametrize("polygon", [[1.3, 0.2, 9.7, 3.1, 5.2, 8.8, 2.0, 6.5, 4.1, 4.0],  # concave pentagon
                                     [-3.0, 4.5, 6.0, -2.0, 14.0, 7.5, 5.5, 12.0]])  # cut by every border
def test_rasterize_polygon_matches_pixel_centre_reference(polygon):
    height, width = 10, 11
    points = np.array(polygon).reshape(-1, 2)
    expected = np.zeros((height, width), dtype=bool)
    for row in range(height):
        for col in range(width):
            x, y, inside = col + 0.5, row + 0.5, False
            for (xa, ya), (xb, yb) in zip(points, np.roll(points, -1, axis=0)):
                if (ya <= y) != (yb <= y) and x < xa + (y - ya) * (xb - xa) / (yb - ya):
                    inside = not inside
            expected[row, col] = inside
    assert expected.sum() > 20
    assert np.array_equal(datasets.rasterize_polygon(polygon, height, width), expected)


def test_rle_with_negative_differences_round_trips():
    rng = np.random.default_rng(5)
    mask = rng.random((7, 9)) < 0.4
    counts = _reference_rle_counts(mask.astype(np.uint8))
    assert np.array_equal(datasets.decode_coco_rle(_reference_rle_string(counts), 7, 9), mask)
    assert np.array_equal(datasets.decode_coco_rle(counts, 7, 9), mask)
    with pytest.raises(DatasetError, match="RLE"):
        datasets.decode_coco_rle(counts[:-1], 7, 9)


# ---------------------------------------------------------------- folder


@pytest.fixture
def folder_tree(tmp_path) -> Path:
    root = tmp_path / "custom"
    for seed, name in enumerate(["a.jpg", "b.png", "c.v2.jpg", "u1.jpg", "u2.png"]):
        _save_image(root / "images" / name, 5, 7, seed)
    _save_mask(root / "masks" / "a.png", np.array([[0, 1, 2, 9, 0, 0, 0]] * 5))
    _save_mask(root / "masks" / "b.png", np.full((5, 7), 2))
    _save_mask(root / "masks" / "c.v2.png", np.full((5, 7), 9))
    (root / "labeled.txt").write_text("a\nc.v2\n")
    (root / "unlabeled.txt").write_text("u1\nu2.png\n")
    (root / "val.txt").write_text("b\n")
    return root


def test_folder_ignore_index_and_keys(folder_tree, tmp_path):
    source = datasets.folder_source(folder_tree / "images", folder_tree / "masks", 3,
                                    labeled_list=folder_tree / "labeled.txt",
                                    unlabeled_list=folder_tree / "unlabeled.txt", val_list=folder_tree / "val.txt",
                                    ignore_index=9, class_names=["bg", "x", "y"], name="custom")
    manifests = datasets.build_dataset(source, tmp_path / "out", max_count=1, progress=False)
    assert {split: m["num_samples"] for split, m in manifests.items()} == {"labeled": 2, "unlabeled": 2, "val": 1}
    assert len(manifests["labeled"]["shards"]) == 2 and manifests["labeled"]["dataset"] == "custom"
    labeled = read_set(tmp_path / "out" / "labeled")
    assert sorted(labeled) == ["a", "c_v2"]  # the dot would split a WebDataset key
    assert np.array_equal(_decode(labeled["a"]["seg.png"]), [[0, 1, 2, 255, 0, 0, 0]] * 5)
    assert manifests["labeled"]["class_pixel_histogram"] == [20, 5, 5]
    assert set(read_set(tmp_path / "out" / "unlabeled")["u2"]) == {"png"}


def _binary_tree(tmp_path: Path) -> Path:
    root = tmp_path / "binary"
    _save_image(root / "images" / "m1.png", 4, 4, 0)
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1:3, 1:3] = 255
    _save_mask(root / "masks" / "m1.png", mask)
    (root / "list.txt").write_text("m1\n")
    return root


def test_folder_binary_0_255_masks_fail_loudly(tmp_path):
    root = _binary_tree(tmp_path)
    source = datasets.folder_source(root / "images", root / "masks", 2, labeled_list=root / "list.txt")
    with pytest.raises(DatasetError, match=r"m1.png.*binary mask stored as 0/255.*--label-map.*--ignore-index 255"):
        datasets.build_dataset(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "labeled" / "manifest.json").exists()


def test_folder_binary_masks_with_label_map_file(tmp_path):
    root = _binary_tree(tmp_path)
    (tmp_path / "map.txt").write_text("# 255 is the foreground\n255 1\n")
    label_map = datasets.read_label_map(tmp_path / "map.txt")
    source = datasets.folder_source(root / "images", root / "masks", 2, labeled_list=root / "list.txt",
                                    label_map=label_map)
    manifests = datasets.build_dataset(source, tmp_path / "out", progress=False)
    assert manifests["labeled"]["class_pixel_histogram"] == [12, 4]
    (tmp_path / "map.json").write_text('{"255": 1}')
    assert datasets.read_label_map(tmp_path / "map.json") == {255: 1}


def test_folder_out_of_range_label_names_key(folder_tree, tmp_path):
    source = datasets.folder_source(folder_tree / "images", folder_tree / "masks", 3,
                                    labeled_list=folder_tree / "labeled.txt")  # 9 is not declared ignore
    with pytest.raises(ShardWriteError, match=r"'a' \(.*a.jpg\).*\[9\]"):
        datasets.build_dataset(source, tmp_path / "out", progress=False)


def test_folder_missing_mask_is_named(folder_tree, tmp_path):
    (folder_tree / "val.txt").write_text("u1\n")
    with pytest.raises(DatasetError, match=r"val list.*no mask.*u1"):
        datasets.folder_source(folder_tree / "images", folder_tree / "masks", 3, val_list=folder_tree / "val.txt")


# ---------------------------------------------------------------- CLI


def _load_build_cli():
    spec = importlib.util.spec_from_file_location("shards_build", REPO_ROOT / "shards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_folder_then_inspect(folder_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    arguments = ["folder", "--images", str(folder_tree / "images"), "--masks", str(folder_tree / "masks"),
                 "--labeled-list", str(folder_tree / "labeled.txt"), "--unlabeled-dir", str(folder_tree / "images"),
                 "--val-list", str(folder_tree / "val.txt"), "--num-classes", "3", "--ignore-index", "9",
                 "--splits", "labeled,val", "--workers", "2", "--shard-size", "1MB", "--out", str(out)]
    # One real run of the script from the repository root; the other calls go through main() in-process.
    result = subprocess.run([sys.executable, "shards/build.py", *arguments], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["labeled", "val"]
    cli = _load_build_cli()
    cli.main(["inspect", str(out)])
    printed = capsys.readouterr().out
    assert "labeled: 2 samples (2 with masks) in 1 shard(s)" in printed and "no problems found" in printed

    without_ignore = arguments[:arguments.index("--ignore-index")] + arguments[arguments.index("--splits"):]
    with pytest.raises(SystemExit, match=r"error: .*'a'.*\[9\]"):
        cli.main(without_ignore)


def test_empty_split_stops_the_build(tmp_path):
    root = _coco_tree(tmp_path)
    source = datasets.coco_source(root, None, splits=("labeled", "unlabeled"))  # no split file, no extra dir
    assert len(source.splits["labeled"]) == 3
    with pytest.raises(DatasetError, match=r"coco: no images for split\(s\) \['unlabeled'\]"):
        datasets.build_dataset(source, tmp_path / "out", progress=False)
