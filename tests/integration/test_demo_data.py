"""Demo dataset: split sizes, manifests, determinism, histograms counted from the decoded masks, CLI."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2pl_scale.data.demo import CLASS_NAMES, DEMO_SPLITS, build_demo, demo_manifest_paths, generate_sample
from shard_helpers import read_set

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> tuple[Path, dict]:
    """The default split sizes; 32 px instead of the default 96 keeps the test fast."""
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo(out, size=32, workers=2, progress=False)


def test_default_demo_counts_and_manifests(default_demo):
    out, manifests = default_demo
    expected = {"labeled": (16, True), "unlabeled": (240, False), "val": (128, True), "full_labeled": (256, True)}
    for name, (count, has_masks) in expected.items():
        manifest = json.loads(demo_manifest_paths(out)[name].read_text())
        assert manifest == manifests[name]
        assert manifest["num_samples"] == count == sum(s["num_samples"] for s in manifest["shards"])
        assert manifest["has_masks"] is has_masks
        assert manifest["num_classes"] == 6 and manifest["class_names"] == CLASS_NAMES
        assert manifest["image_size_range"] == {"min": [32, 32], "max": [32, 32]}
        assert manifest["split"] == ("labeled" if name == "full_labeled" else name)


def test_unlabeled_has_no_masks_and_labeled_sets_split_the_train_images(default_demo):
    out, _ = default_demo
    unlabeled = read_set(out / "unlabeled")
    assert all(set(members) == {"png"} for members in unlabeled.values())
    labeled, full = read_set(out / "labeled"), read_set(out / "full_labeled")
    assert set(labeled).isdisjoint(unlabeled) and set(labeled) | set(unlabeled) == set(full)
    key = sorted(unlabeled)[0]
    assert unlabeled[key]["png"] == full[key]["png"]


def test_histogram_matches_decoded_masks_and_every_class_occurs(default_demo):
    out, manifests = default_demo
    for name in ("labeled", "val", "full_labeled"):
        counts = np.zeros(6, dtype=np.int64)
        for key, members in read_set(out / name).items():
            mask = np.array(Image.open(io.BytesIO(members["seg.png"])))
            image = np.array(Image.open(io.BytesIO(members["png"])))
            assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
            values = set(np.unique(mask).tolist())
            assert values <= set(range(6)) | {255}
            for class_id in range(6):
                counts[class_id] += int(np.count_nonzero(mask == class_id))
        assert manifests[name]["class_pixel_histogram"] == counts.tolist()
        assert (counts > 0).all()


def test_build_is_deterministic_and_seed_dependent(tmp_path):
    options = dict(num_train=64, num_val=8, labeled_fraction=0.25, samples_per_shard=16, progress=False)
    first = build_demo(tmp_path / "a", seed=3, **options)
    second = build_demo(tmp_path / "b", seed=3, workers=2, **options)
    other_seed = build_demo(tmp_path / "c", seed=4, **options)
    for name in first:
        assert first[name]["shards"] == second[name]["shards"]
        assert first[name]["shards"] != other_seed[name]["shards"]
    assert first["labeled"]["num_samples"] == 16 and first["unlabeled"]["num_samples"] == 48


def test_colour_alone_does_not_name_the_class():
    """Object hues come in overlapping class families: the nearest family by hue is right for only about two
    objects in three (a third have a hue of their own class alone, two thirds one shared by two classes, where
    it is right half the time), so shape and texture must decide the rest; yet colour is a real, partial cue."""
    import colorsys
    centres = np.arange(5) / 5
    right = total = 0
    for index in range(80):
        image, mask = generate_sample(0, 0, index)
        for class_id in range(1, 6):
            if (mask == class_id).sum() > 30:
                r, g, b = image[mask == class_id].astype(np.float64).mean(axis=0) / 255
                hue = colorsys.rgb_to_hsv(r, g, b)[0]
                distance = np.abs((hue - centres + 0.5) % 1.0 - 0.5)  # on the hue circle
                right += int(np.argmin(distance)) + 1 == class_id
                total += 1
    assert total >= 100
    assert 0.5 < right / total < 0.8, (right, total)


def test_generate_sample_sizes():
    image, mask = generate_sample(1, 0, 5)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8 and mask.shape == (96, 96)
    image, mask = generate_sample(1, 0, 5, size=48)
    assert image.shape == (48, 48, 3) and mask.shape == (48, 48)


def test_cli_builds_from_repo_root(tmp_path):
    result = subprocess.run([sys.executable, "shards/build.py", "demo", "--out", str(tmp_path / "cli"),
                             "--num-train", "32", "--num-val", "4", "--labeled-fraction", "0.25", "--size", "32"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "cli" / "labeled" / "manifest.json").read_text())
    assert manifest["num_samples"] == 8 and manifest["image_size_range"]["max"] == [32, 32]


def test_bad_labeled_fraction_is_refused(tmp_path):
    with pytest.raises(ValueError, match="labeled_fraction"):
        build_demo(tmp_path, num_train=10, labeled_fraction=0.01, progress=False)


def test_shards_from_an_older_demo_generator_are_rebuilt(tmp_path):
    from u2pl_scale.config import load_config
    from u2pl_scale.data.demo import DEMO_DATASET
    from u2pl_scale.engine.trainer import ensure_demo_data

    root = tmp_path / "demo"
    options = dict(num_train=32, num_val=4, labeled_fraction=0.25, samples_per_shard=16, progress=False)
    build_demo(root, **options)
    for split in DEMO_SPLITS:  # pretend an older generator wrote them
        manifest_path = root / split / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["dataset"] = "demo"
        manifest_path.write_text(json.dumps(manifest))
    (root / "labeled" / "old-shard-000099.tar").write_bytes(b"stale")
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml",
                      [f"data.{split}={root / split}" for split in ("labeled", "unlabeled", "val")])
    ensure_demo_data(cfg)
    for split in ("labeled", "unlabeled", "val"):
        assert json.loads((root / split / "manifest.json").read_text())["dataset"] == DEMO_DATASET
    assert not (root / "labeled" / "old-shard-000099.tar").exists()
    ensure_demo_data(cfg)  # current shards are left alone
    assert (root / "labeled" / "manifest.json").is_file()


def test_an_interrupted_demo_build_is_rebuilt_and_another_dataset_is_left_alone(tmp_path):
    from u2pl_scale.config import load_config
    from u2pl_scale.data.demo import DEMO_DATASET, demo_state
    from u2pl_scale.engine.trainer import ensure_demo_data

    root = tmp_path / "demo"
    build_demo(root, num_train=32, num_val=4, labeled_fraction=0.25, samples_per_shard=16, progress=False)
    assert demo_state(root) == "ready"
    # interrupted before the last set's manifest: the three sets a config reads look finished, the demo is not
    demo_manifest_paths(root)["full_labeled"].unlink()
    assert demo_state(root) == "unfinished"
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml",
                      [f"data.{split}={root / split}" for split in ("labeled", "unlabeled", "val")])
    ensure_demo_data(cfg)
    assert demo_state(root) == "ready"
    assert json.loads(demo_manifest_paths(root)["full_labeled"].read_text())["dataset"] == DEMO_DATASET
    assert json.loads(demo_manifest_paths(root)["labeled"].read_text())["num_samples"] == 16  # the default build

    # a directory named demo that holds someone's own sets is never replaced; a set it lacks is named
    other = tmp_path / "mine" / "demo"
    build_demo(other, num_train=32, num_val=4, labeled_fraction=0.25, samples_per_shard=16, progress=False)
    for path in demo_manifest_paths(other).values():
        manifest = json.loads(path.read_text())
        manifest["dataset"] = "my-dataset"
        path.write_text(json.dumps(manifest))
    demo_manifest_paths(other)["val"].unlink()
    assert demo_state(other) == "foreign"
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml",
                      [f"data.{split}={other / split}" for split in ("labeled", "unlabeled", "val")])
    with pytest.raises(FileNotFoundError, match=str(other / "val")):
        ensure_demo_data(cfg)
    assert json.loads(demo_manifest_paths(other)["labeled"].read_text())["dataset"] == "my-dataset"


def test_processes_ensuring_the_same_demo_at_once_build_it_once(tmp_path, monkeypatch):
    """Two callers at once (test workers, two jobs on one node): one builds, the other waits for it and finds the
    build ready. The build is a stand-in that takes a while, so that without the lock both would build."""
    import threading
    import time

    from u2pl_scale.data import demo
    from u2pl_scale.data.demo import DEMO_DATASET, demo_state, ensure_demo

    calls, running, peak = [], [0], [0]
    guard = threading.Lock()

    def slow_build(out_root, progress):
        with guard:
            calls.append(out_root)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.5)
        for path in demo_manifest_paths(out_root).values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"dataset": DEMO_DATASET}))
        with guard:
            running[0] -= 1

    monkeypatch.setattr(demo, "build_demo", slow_build)
    root = tmp_path / "demo"
    results = [None, None]

    def call(i):
        results[i] = ensure_demo(root, progress=False)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [False, True]  # one built, the other found it built
    assert len(calls) == 1 and peak[0] == 1
    assert demo_state(root) == "ready"
