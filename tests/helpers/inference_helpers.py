"""A tiny trained demo run shared by the tests/integration/test_inference_*.py modules (trained once per process)."""
from __future__ import annotations

import atexit
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# resnet10t, 48 px crops, 2 x 5 steps (supervised warm-up, then U2PL), one evaluation at the end: best.pt is the
# final (teacher) evaluation, so summary.json's miou and per_class_iou are best.pt's figures
TINY = ["train.progress_bar=false", "model.backbone=resnet10t", "data.steps_per_epoch=5", "train.epochs=2",
        "data.batch_size_labeled=8", "data.batch_size_unlabeled=4", "data.num_workers=0", "data.crop_size=48",
        "method.contrastive.num_anchors=16", "method.contrastive.queue_size=500", "eval.num_pictures=0",
        "eval.interval_epochs=99", "optim.name=adamw", "optim.lr=0.003", "train.log_interval=5"]
_RUN: dict = {}


def trained_run() -> Path:
    """The run directory of a tiny demo training (best.pt, summary.json, checkpoints/)."""
    if "dir" not in _RUN:
        from u2pl_scale.config import load_config
        from u2pl_scale.data.demo import ensure_demo
        from u2pl_scale.engine.trainer import train

        ensure_demo(REPO / "shards" / "demo", progress=False)
        root = Path(tempfile.mkdtemp(prefix="u2pl_inference_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        run_dir = root / "run"
        cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [f"train.run_dir={run_dir}"])
        train(cfg)
        _RUN["dir"] = run_dir
    return _RUN["dir"]


def one_shard_val(tmp_path: Path) -> Path:
    """A val set of the demo's first val shard (64 images): its manifest beside a link to the shard."""
    demo_val = REPO / "shards" / "demo" / "val"
    val = tmp_path / "val_one_shard"
    val.mkdir()
    manifest = json.loads((demo_val / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["num_samples"] = manifest["shards"][0]["num_samples"]
    (val / "manifest.json").write_text(json.dumps(manifest))
    (val / manifest["shards"][0]["name"]).symlink_to(demo_val / manifest["shards"][0]["name"])
    return val


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def launcher(name: str):
    """launchers/<name>.py as a module (its main(argv) runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", REPO / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
