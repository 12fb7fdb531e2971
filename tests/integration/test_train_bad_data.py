"""A corrupt image in a labeled shard: skipped and counted in the logs and summary.json, or an error naming it."""
import io
import json
import tarfile
from pathlib import Path

import pytest

from u2pl_scale.config import load_config
from u2pl_scale.data.decode import BadSample
from u2pl_scale.engine.trainer import train

REPO = Path(__file__).resolve().parents[2]


def small_labeled_set_with_a_corrupt_image(demo: Path, out: Path) -> str:
    """The first 8 demo labeled samples, the 4th image truncated; returns the corrupted key."""
    out.mkdir(parents=True)
    manifest = json.loads((demo / "labeled" / "manifest.json").read_text())
    src = demo / "labeled" / manifest["shards"][0]["name"]
    members = []
    with tarfile.open(src) as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read()))
    keys = sorted({info.name.split(".")[0] for info, _ in members})[:8]
    bad_key = keys[3]
    with tarfile.open(out / "labeled-000000.tar", "w") as tar:
        for info, data in members:
            key = info.name.split(".")[0]
            if key not in keys:
                continue
            if key == bad_key and not info.name.endswith(".seg.png"):
                data = data[: len(data) // 3]  # truncated image
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest.update(num_samples=8, shards=[{"name": "labeled-000000.tar", "num_samples": 8, "sha256": ""}])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return bad_key


def overrides(tmp_path, labeled):
    return ["train.progress_bar=false", "data.steps_per_epoch=3", "train.epochs=1", "data.batch_size_labeled=4",
            "data.num_workers=0", "data.shuffle_buffer=1", "train.log_interval=1", "method.name=supervised", f"data.labeled={labeled}",
            f"train.run_dir={tmp_path / 'run'}", "eval.num_pictures=0"]


def test_corrupt_image_is_skipped_and_counted(demo_shards, tmp_path):
    labeled = tmp_path / "labeled"
    small_labeled_set_with_a_corrupt_image(demo_shards, labeled)
    summary = train(load_config(REPO / "configs" / "demo.yaml", overrides(tmp_path, labeled)))
    assert summary["steps"] == 3
    # no shuffling, one shard: 12 good images = pass 1 (k0-k2, bad k3, k4-k7: 7 good) + pass 2 up to k5,
    # so the corrupt k3 is met twice
    assert summary["bad_samples"] == {"corrupt_image": 2}
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("bad_samples", {}).get("corrupt_image") for m in logged)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["bad_samples"] == {"corrupt_image": 2}


def test_corrupt_image_stops_the_run_in_error_mode(demo_shards, tmp_path):
    labeled = tmp_path / "labeled"
    bad_key = small_labeled_set_with_a_corrupt_image(demo_shards, labeled)
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides(tmp_path, labeled) + ["data.on_bad_sample=error"])
    with pytest.raises(BadSample) as err:
        train(cfg)
    assert bad_key in str(err.value) and "labeled-000000.tar" in str(err.value)
