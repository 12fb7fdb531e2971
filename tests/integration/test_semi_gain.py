"""benchmarks/semi_gain.py (foundation item 9) at a tiny budget: the plumbing, not the gain.

The runs' own summary.json files are the independent source for the table and the gain it prints.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
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


# ---- any dataset: --config / --labeled / --unlabeled / --val / --test / --precision / --full DIR (issue 20 item 6)

def load_semi_gain():
    import importlib.util

    spec = importlib.util.spec_from_file_location("semi_gain_module", REPO / "benchmarks" / "semi_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_set(set_dir: Path, mean, std) -> list:
    """(normalised image [1, 3, H, W], label [H, W]) of every sample in a set's tar shards, read with tarfile and
    PIL (not the project's loaders)."""
    import io
    import tarfile

    import numpy as np
    import torch
    from PIL import Image

    members = {}
    for tar_path in sorted(set_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    samples = []
    for sample in members.values():
        image = next(v for k, v in sample.items() if k in ("png", "jpg", "jpeg"))
        image = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32)
        image = (image - np.array(mean, np.float32)) / np.array(std, np.float32)
        label = np.asarray(Image.open(io.BytesIO(sample["seg.png"])), dtype=np.int64)
        samples.append((torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(label)))
    return samples


def independent_miou(model, samples: list, num_classes: int) -> float:
    """mIoU over the classes present, from a confusion matrix of the model's fp32 argmax (logits bilinearly resized
    to the image, as the protocol says), in numpy; not evaluate()."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    model.eval()
    for image, label in samples:
        with torch.no_grad():
            logits = F.interpolate(model(image)["pred"].float(), size=label.shape, mode="bilinear",
                                   align_corners=True)
        pred, label = logits.argmax(1)[0].numpy(), label.numpy()
        valid = label != 255
        conf += np.bincount(label[valid] * num_classes + pred[valid], minlength=num_classes ** 2).reshape(
            num_classes, num_classes)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_the_test_split_evaluation_equals_an_independent_miou(demo_shards, tmp_path):
    import torch
    import torch.nn.functional as F

    from u2pl_scale.config import load_config, to_yaml
    from u2pl_scale.model import build_model

    cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                      ["model.backbone=resnet10t", "model.head_channels=16", "model.low_level_channels=8",
                       "model.rep_dim=8", "train.precision=fp32", "data.batch_size_val=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes)
    # a few steps on the 16 labeled images: predictions that vary with the image, not one class everywhere
    train = read_set(demo_shards / "labeled", cfg.data.mean, cfg.data.std)
    images, labels = torch.cat([x for x, _ in train]), torch.stack([y for _, y in train])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(5):
        logits = F.interpolate(model(images)["pred"], size=labels.shape[-2:], mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))  # as a run writes them
    torch.save({"model": model.state_dict(), "step": 7, "miou": 0.25}, tmp_path / "best.pt")
    result = load_semi_gain().evaluate_on_test(tmp_path, str(demo_shards / "val"))
    val = read_set(demo_shards / "val", cfg.data.mean, cfg.data.std)
    expected = independent_miou(model, val, cfg.data.num_classes)
    assert len(val) == 128 and 0.05 < expected < 1
    assert abs(result["miou"] - expected) < 1e-6, (result["miou"], expected)
    assert (result["eval_mode"], result["best_step"], result["best_val_miou"]) == ("whole", 7, 0.25)


def test_the_new_options_parse_and_both_arms_differ_only_in_the_method(tmp_path):
    sg = load_semi_gain()
    args = sg.parse_args([])  # the demo, as before
    assert args.config == sg.DEMO_CONFIG and args.init == "pretrained" and args.seeds is None
    assert args.test is None and args.full is None and args.precision is None
    plan = sg.plan_runs(args, sg.titles("1/16"), ["model.pretrained=false"])
    assert set(plan) == {("U2PL (1/16 labels + unlabeled)", None), ("supervised-only (1/16 labels)", None)}
    assert all(set(sg.DEMO_BUDGET) <= set(overrides) for _, overrides in plan.values())

    args = sg.parse_args(["--config", "configs/msrc21.yaml", "--labeled", "L", "--unlabeled", "U", "--val", "V",
                          "--test", "T", "--full", "F", "--seeds", "0,1,2", "--precision", "bf16",
                          "train.epochs=3", "data.crop_size=64"])
    assert args.config == (Path.cwd() / "configs" / "msrc21.yaml").resolve() and args.init == "config"
    assert [args.labeled, args.unlabeled, args.val, args.test, args.full] == [
        str(Path(p).resolve()) for p in "LUVTF"]  # absolute: the runs start in the repository
    assert args.seeds == [0, 1, 2] and args.precision == "bf16"
    rows = sg.titles("35/276")
    plan = sg.plan_runs(args, rows, [])
    for seed in (0, 1, 2):
        (sup_dir, sup), (u2pl_dir, u2pl), (full_dir, full) = (plan[row, seed] for row in rows)
        assert (sup_dir, u2pl_dir, full_dir) == (f"seed{seed}/supervised", f"seed{seed}/u2pl", f"seed{seed}/full")
        assert [o for o in sup if o != "method.name=supervised"] == [o for o in u2pl if o != "method.name=u2pl"]
        assert sup[-1] == "method.name=supervised" and u2pl[-1] == "method.name=u2pl"  # after the user's overrides
        assert {f"data.labeled={args.labeled}", f"data.unlabeled={args.unlabeled}", f"data.val={args.val}",
                "train.precision=bf16", "train.epochs=3", "data.crop_size=64", f"train.seed={seed}"} <= set(sup)
        assert not set(sg.DEMO_BUDGET) & set(sup)  # the demo budget is the demo's only
        assert full[-2:] == ["method.name=supervised", f"data.labeled={args.full}"]
    assert sg.parse_args(["--full"]).full == ""  # bare: full_labeled beside data.labeled, resolved in main
    assert sg.parse_args(["--config", "configs/msrc21.yaml", "--init", "pretrained"]).init == "pretrained"
    for bad in (["--precision", "fp16"], ["--seeds", "1,1"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            sg.parse_args(bad)


def test_label_share_names_the_labeled_fraction(demo_shards, tmp_path):
    sg = load_semi_gain()
    assert sg.label_share(str(demo_shards / "labeled"), str(demo_shards / "unlabeled")) == "1/16"
    for name, count in (("l", 35), ("u", 241)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"num_samples": count}))
    assert sg.label_share(str(tmp_path / "l"), str(tmp_path / "u")) == "35/276"
    assert sg.label_share(str(tmp_path / "nope"), str(tmp_path / "u")) == "some"


def test_test_option_reports_best_checkpoint_test_miou_and_the_gain_on_test(demo_shards, tmp_path):
    # val as the "test" set and one evaluation (at the end): each run's test mIoU must be its own val mIoU
    proc = semi_gain(tmp_path, "--init", "scratch", "--precision", "fp32", "--test", str(demo_shards / "val"),
                     "--labeled", str(demo_shards / "labeled"), *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| run | seed | val mIoU (%) | test mIoU (%) | steps | wall (s) | eval |" in proc.stdout
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    tests = {}
    for title, name in [("supervised-only (1/16 labels)", "supervised"), ("U2PL (1/16 labels + unlabeled)", "u2pl")]:
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        config = yaml.safe_load((tmp_path / "out" / name / "config.yaml").read_text())
        assert config["train"]["precision"] == "fp32" and config["data"]["labeled"] == str(demo_shards / "labeled")
        row = re.search(rf"\| {re.escape(title)} \| 0 \| ([0-9.]+) \| ([0-9.]+) \| 8 \|", proc.stdout)
        assert row and float(row.group(1)) == round(100 * summary["miou"], 2), title
        assert float(row.group(2)) == round(100 * table[title]["test"]["miou"], 2)
        assert abs(table[title]["test"]["miou"] - summary["miou"]) < 1e-9
        assert table[title]["test"]["best_step"] == 8
        tests[name] = table[title]["test"]["miou"]
    gain = re.search(r"U2PL gain over supervised-only on test: ([+-][0-9.]+) mIoU", proc.stdout)
    assert gain and float(gain.group(1)) == round(100 * (tests["u2pl"] - tests["supervised"]), 2)
    assert table["gain"]["on"] == "test" and table["gain"]["mean"] == tests["u2pl"] - tests["supervised"]
