"""benchmarks/semi_gain.py (foundation item 9) at a tiny budget: the plumbing, not the gain.

The runs' own summary.json files are the independent source for the table and the gain it prints.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.steps_per_epoch=4", "train.epochs=2", "eval.interval_epochs=2", "data.batch_size_labeled=4",
        "data.batch_size_unlabeled=4", "data.num_workers=0", "eval.num_pictures=1",
        "method.contrastive.num_anchors=16", "method.contrastive.queue_size=500"]


def semi_gain(tmp_path, *args):
    cmd = [sys.executable, str(REPO / "benchmarks" / "semi_gain.py"), "--out", str(tmp_path / "out"), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)  # not from the repo


def test_semi_gain_runs_side_by_side_and_reports_the_runs_own_results(demo_shards, tmp_path):
    from u2pl_scale.data.demo_backbone import PretrainSettings, pretrain_backbone
    backbone = tmp_path / "tiny.safetensors"  # a given file is used as it is (the default one is built)
    pretrain_backbone(backbone, PretrainSettings(num_images=64, steps=2, batch_size=8, held_out=8), progress=False)
    proc = semi_gain(tmp_path, "--full", "--backbone-file", str(backbone), *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = {name: json.loads((tmp_path / "out" / name / "summary.json").read_text())
                 for name in ("supervised", "u2pl", "full")}
    configs = {name: yaml.safe_load((tmp_path / "out" / name / "config.yaml").read_text()) for name in summaries}
    assert {s["steps"] for s in summaries.values()} == {8}
    assert [summaries[name]["method"] for name in ("supervised", "u2pl", "full")] == ["supervised", "u2pl",
                                                                                       "supervised"]
    assert configs["full"]["data"]["labeled"].endswith("full_labeled")
    # all three start from the same pretrained backbone
    assert all(c["model"]["pretrained"] and c["model"]["pretrained_path"] == str(backbone) for c in configs.values())
    assert not configs["supervised"]["data"]["labeled"].endswith("full_labeled")
    # two runs at a time, each on its share of the cores
    assert {c["train"]["num_threads"] for c in configs.values()} == {max(1, (os.cpu_count() or 1) // 2)}
    for title, name in [("supervised-only (1/16 labels)", "supervised"), ("U2PL (1/16 labels + unlabeled)", "u2pl"),
                        ("supervised, all labels (reference)", "full")]:
        row = re.search(rf"\| {re.escape(title)} \| 0 \| ([0-9.]+) \| 8 \|", proc.stdout)  # the config's seed
        assert row and float(row.group(1)) == round(100 * summaries[name]["miou"], 2), title
    gain = re.search(r"U2PL gain over supervised-only: ([+-][0-9.]+) mIoU", proc.stdout)
    assert gain and float(gain.group(1)) == round(100 * (summaries["u2pl"]["miou"] - summaries["supervised"]["miou"]), 2)
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert table["U2PL (1/16 labels + unlabeled)"]["miou"] == summaries["u2pl"]["miou"]


def test_seeds_train_every_run_once_per_seed_and_report_the_mean_gain(demo_shards, tmp_path):
    proc = semi_gain(tmp_path, "--init", "scratch", "--seeds", "3,4", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gains = {}
    for seed in (3, 4):
        runs = {name: tmp_path / "out" / f"seed{seed}" / name for name in ("supervised", "u2pl")}
        summaries = {name: json.loads((d / "summary.json").read_text()) for name, d in runs.items()}
        assert {yaml.safe_load((d / "config.yaml").read_text())["train"]["seed"] for d in runs.values()} == {seed}
        for title, name in [("supervised-only (1/16 labels)", "supervised"),
                            ("U2PL (1/16 labels + unlabeled)", "u2pl")]:
            row = re.search(rf"\| {re.escape(title)} \| {seed} \| ([0-9.]+) \| 8 \|", proc.stdout)
            assert row and float(row.group(1)) == round(100 * summaries[name]["miou"], 2), (title, seed)
        gains[seed] = 100 * (summaries["u2pl"]["miou"] - summaries["supervised"]["miou"])
    by_seed = re.search(r"by seed: 3: ([+-][0-9.]+), 4: ([+-][0-9.]+)", proc.stdout)
    assert by_seed and [float(g) for g in by_seed.groups()] == [round(gains[3], 2), round(gains[4], 2)]
    mean = re.search(r"mean ([+-][0-9.]+) mIoU over 2 seeds, standard deviation ([0-9.]+)", proc.stdout)
    assert mean and abs(float(mean.group(1)) - (gains[3] + gains[4]) / 2) < 0.006
    assert abs(float(mean.group(2)) - abs(gains[3] - gains[4]) / 2 ** 0.5) < 0.006  # sample std of two values


def test_a_failing_run_stops_the_benchmark_and_names_it(demo_shards, tmp_path):
    proc = semi_gain(tmp_path, "--init", "scratch", *TINY, "method.contrastive.temperature=-1")
    assert proc.returncode != 0
    assert "run failed" in proc.stderr and "method.contrastive.temperature" in proc.stderr


def test_a_missing_backbone_file_is_named(demo_shards, tmp_path):
    proc = semi_gain(tmp_path, "--backbone-file", str(tmp_path / "nope.safetensors"), *TINY)
    assert proc.returncode != 0 and "nope.safetensors" in proc.stderr


def test_the_backbone_build_gets_the_users_openmp_policy_not_the_packages_default(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("semi_gain", REPO / "benchmarks" / "semi_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as importing u2pl_scale sets it in this process
    assert "OMP_WAIT_POLICY" not in module.backbone_build_env(None)  # unset by the user: the CLI chooses
    assert module.backbone_build_env("passive")["OMP_WAIT_POLICY"] == "passive"
    assert module.backbone_build_env(None)["PATH"] == os.environ["PATH"]
