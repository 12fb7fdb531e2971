"""The demo backbone (u2pl_scale/data/demo_backbone.py): pretraining images, the weights file, loading, learning."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from u2pl_scale.data import demo
from u2pl_scale.data.demo_backbone import (DEMO_BACKBONE_VERSION, PretrainSettings, demo_backbone_ready,
                                           pretrain_backbone, pretrain_sample)
from u2pl_scale.model.deeplab import DeepLabV3Plus

TINY = PretrainSettings(num_images=128, steps=4, batch_size=16, held_out=32)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("backbone") / "resnet10t.safetensors"
    return path, pretrain_backbone(path, TINY, progress=False)


def test_weights_are_safetensors_with_a_report_and_load_into_the_segmentation_model(tiny_backbone):
    path, report = tiny_backbone
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]  # safetensors: u64 header length, JSON header
    assert json.loads(path.read_bytes()[8:8 + header_size])["__metadata__"]["version"] == DEMO_BACKBONE_VERSION
    assert json.loads(path.with_name(path.name + ".json").read_text()) == report
    assert report["settings"]["steps"] == 4 and 0 <= report["held_out_shape_accuracy"] <= 1
    weights = load_file(str(path))
    model = DeepLabV3Plus("resnet10t", 6, pretrained=True, pretrained_path=str(path), aspp_dilations=(2, 4, 6),
                          head_channels=32, low_level_channels=16, rep_dim=16)
    own = model.backbone.state_dict()
    assert set(weights) == set(own)  # every backbone tensor comes from the file
    assert all(torch.equal(own[k], weights[k]) for k in own)
    assert not torch.equal(weights["conv1.0.weight"], DeepLabV3Plus(
        "resnet10t", 6, aspp_dilations=(2, 4, 6), head_channels=32, low_level_channels=16,
        rep_dim=16).backbone.state_dict()["conv1.0.weight"])


def test_ready_only_for_a_finished_build_of_the_same_settings(tiny_backbone, tmp_path):
    path, _ = tiny_backbone
    assert demo_backbone_ready(path, TINY)
    assert not demo_backbone_ready(path)  # the default settings differ
    assert not demo_backbone_ready(tmp_path / "missing.safetensors", TINY)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(path.read_bytes())  # weights without the report that is written last
    assert not demo_backbone_ready(lone, TINY)


def test_pretraining_is_deterministic(tiny_backbone, tmp_path):
    path, _ = tiny_backbone
    again = pretrain_backbone(tmp_path / "again.safetensors", TINY, progress=False)
    first, second = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again["held_out_shape_accuracy"] == tiny_backbone[1]["held_out_shape_accuracy"]


def test_only_safetensors_is_written(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        pretrain_backbone(tmp_path / "weights.pt", TINY, progress=False)


def test_pretraining_images_carry_no_colour_cue_and_are_not_demo_images():
    """Hue is uniform whatever the shape: the mean hue direction of each shape's images is near zero length."""
    import colorsys
    per_shape = {i: [] for i in range(len(demo.SHAPES))}
    for index in range(400):
        image, shape_id, texture_id = pretrain_sample(0, index)
        assert 0 <= texture_id < len(demo.TEXTURES)
        centre = image[20:28, 20:28].reshape(-1, 3).astype(np.float64).mean(0) / 255  # the object's middle
        per_shape[shape_id].append(colorsys.rgb_to_hsv(*centre)[0])
        if index < 8:
            assert not np.array_equal(image, demo.generate_sample(0, 0, index, size=48)[0])
    for hues in per_shape.values():
        assert len(hues) > 50
        angles = 2 * np.pi * np.array(hues)
        assert np.hypot(np.cos(angles).mean(), np.sin(angles).mean()) < 0.3  # one hue family would give ~0.9


def test_pretraining_learns_shape_and_texture(tmp_path):
    settings = PretrainSettings(num_images=1024, steps=250, batch_size=64, held_out=200)  # ~45 s (bf16), ~105 s (fp32, AVX2)
    report = pretrain_backbone(tmp_path / "b.safetensors", settings, progress=False)
    # chance is 0.2 for each: both heads must have learned from the images
    assert report["held_out_shape_accuracy"] > 0.5 and report["held_out_texture_accuracy"] > 0.5, report


def test_the_cli_trains_with_spinning_openmp_workers_and_the_same_weights_as_sleeping_ones(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    weights, reports = {}, {}
    for policy in (None, "PASSIVE"):  # None: the CLI's choice; PASSIVE: the package's default, set by the user
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        out = tmp_path / f"{policy}.safetensors"
        proc = subprocess.run([sys.executable, "shards/build.py", "demo-backbone", "--out", str(out), "--steps", "3",
                               "--num-images", "64"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights[policy] = load_file(str(out))
        reports[policy] = json.loads(out.with_name(out.name + ".json").read_text())
    assert reports[None]["omp_wait_policy"] == "ACTIVE" and reports["PASSIVE"]["omp_wait_policy"] == "PASSIVE"
    assert reports[None]["threads"] == reports["PASSIVE"]["threads"]
    assert weights[None].keys() == weights["PASSIVE"].keys()
    assert all(torch.equal(weights[None][k], weights["PASSIVE"][k]) for k in weights[None])
