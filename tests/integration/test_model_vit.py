"""ViT encoders (issue 22): DINOv2 / DINOv3 layouts through timm at a tiny random size, the DPT-style decoder to
stride 4, weight loading with the complete-load check, the frozen encoder, the ViT optimiser recipe, and U2PL
steps through the trainer (resume included)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from digests import state_digests
from u2pl_scale.config import load_config
from u2pl_scale.engine.optim import build_optimizer, param_groups
from u2pl_scale.model import build_model
from u2pl_scale.model.vit import default_blocks

REPO = Path(__file__).resolve().parents[2]
TINY = {"embed_dim": 48, "depth": 4, "num_heads": 3}
FAMILIES = ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"]


def model_cfg(backbone: str, *extra: str, kwargs: dict = TINY):
    return load_config(REPO / "configs" / "demo_vit.yaml", [f"model.backbone={backbone}", "model.head_channels=32",
                                                            "model.rep_dim=16", "model.backbone_kwargs="
                                                            + json.dumps(kwargs), *extra]).model


def test_default_blocks_are_unimatch_v2s():
    assert default_blocks(12) == [2, 5, 8, 11] and default_blocks(24) == [4, 11, 17, 23]
    assert default_blocks(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("backbone", FAMILIES + ["convnext_atto"])
@pytest.mark.parametrize("size", [(56, 56), (50, 71)])  # a multiple of 14, and neither 14's nor 16's
def test_every_family_gives_stride_4_outputs_for_any_crop(backbone, size):
    kwargs = TINY if backbone.startswith("vit") else {}
    model = build_model(model_cfg(backbone, "model.output_stride=16", kwargs=kwargs), num_classes=5).eval()
    out = model(torch.randn(2, 3, *size))
    # the ViT pads to its patch and crops back: ceil; ConvNeXt's stride-4 stem conv has no padding: floor
    rounding = math.ceil if backbone.startswith("vit") else math.floor
    stride4 = (rounding(size[0] / 4), rounding(size[1] / 4))
    assert out["pred"].shape == (2, 5, *stride4) and out["rep"].shape == (2, 16, *stride4)
    if backbone.startswith("vit"):
        assert model.blocks == [0, 1, 2, 3]  # four of the 4 tiny blocks


def test_blocks_are_read_with_the_final_norm():
    """The decoder sees block outputs after the encoder's final norm: an independent forward through the blocks."""
    model = build_model(model_cfg(FAMILIES[0], "model.vit_blocks=[0,1,2,3]"), num_classes=3).eval()
    vit, x = model.backbone, torch.randn(1, 3, 28, 42)
    seen = []
    model.reassemble[1][0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(x)
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for block in vit.blocks[:2]:
        tokens = block(tokens)
    grid = vit.norm(tokens)[:, vit.num_prefix_tokens:].reshape(1, 2, 3, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(seen[0], grid)


def test_local_weights_load_completely_or_fail_naming_tensors(tmp_path):
    cfg = model_cfg(FAMILIES[0])
    source = build_model(cfg, num_classes=3)
    weights = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    weights["head.weight"] = torch.zeros(1000, 48)  # an ImageNet classifier: an expected drop
    torch.save(weights, tmp_path / "vit.pth")
    cfg = model_cfg(FAMILIES[0], "model.pretrained=true", f"model.pretrained_path={tmp_path / 'vit.pth'}")
    loaded = build_model(cfg, num_classes=3)
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[k], v), k
    del weights["blocks.3.mlp.fc2.weight"]
    torch.save(weights, tmp_path / "partial.pth")
    cfg = model_cfg(FAMILIES[0], "model.pretrained=true", f"model.pretrained_path={tmp_path / 'partial.pth'}")
    with pytest.raises(ValueError, match=r"1 backbone tensors not in the file .*blocks\.3\.mlp\.fc2\.weight"):
        build_model(cfg, num_classes=3)


def test_frozen_encoder_gets_no_gradient_and_no_optimiser_state():
    cfg = load_config(REPO / "configs" / "demo_vit.yaml", ["model.freeze_backbone=true"])
    model = build_model(cfg.model, num_classes=6)
    out = model(torch.randn(2, 3, 42, 42))
    (out["pred"].mean() + out["rep"].mean()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr, torch.device("cpu"))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.backbone.parameters()}
    optimizer.step()
    assert optimizer.state and not {id(p) for p in optimizer.state} & {id(p) for p in model.backbone.parameters()}


def test_vit_recipe_groups_layer_decay_and_no_decay():
    model = build_model(model_cfg(FAMILIES[0]), num_classes=3)
    groups = param_groups(model, lr=1e-3, head_multiplier=40.0, weight_decay=0.01, layer_decay=0.5,
                          no_decay_norm_bias=True)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # L = 4 blocks: block i -> lr x 0.5^(4 - i); embeddings 0.5^5; final norm as the top (x1); heads x40
    for i in range(4):
        assert where[id(named[f"backbone.blocks.{i}.attn.qkv.weight"])]["lr"] == pytest.approx(1e-3 * 0.5 ** (4 - i))
    assert where[id(named["backbone.patch_embed.proj.weight"])]["lr"] == pytest.approx(1e-3 * 0.5 ** 5)
    assert where[id(named["backbone.pos_embed"])]["weight_decay"] == 0.0
    assert where[id(named["backbone.cls_token"])]["weight_decay"] == 0.0
    assert where[id(named["backbone.blocks.0.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert where[id(named["backbone.blocks.0.norm1.weight"])]["weight_decay"] == 0.0
    assert where[id(named["backbone.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.01
    head = where[id(named["classifier.0.0.weight"])]
    assert head["lr"] == pytest.approx(1e-3 * 40) and head["weight_decay"] == 0.01
    assert sum(len(g["params"]) for g in groups) == len(named)  # every parameter exactly once


TRAIN = ["train.progress_bar=false", "data.steps_per_epoch=3", "train.epochs=2", "data.batch_size_labeled=4",
         "data.batch_size_unlabeled=4", "data.num_workers=0", "train.log_interval=1", "eval.interval_epochs=99",
         "eval.num_pictures=0", "method.contrastive.num_anchors=16", "method.contrastive.queue_size=500",
         "train.checkpoint_interval=1", "train.keep_checkpoints=10"]


def test_u2pl_steps_on_a_vit_and_an_exact_resume(demo_shards, tmp_path):
    from u2pl_scale.engine.trainer import train

    def cfg(run_dir, *extra):
        return load_config(REPO / "configs" / "demo_vit.yaml", TRAIN + [f"train.run_dir={run_dir}", *extra])

    summary = train(cfg(tmp_path / "full"))
    assert summary["steps"] == 6 and summary["evaluated_model"] == "teacher"
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    semi = [r for r in rows if r["kind"] == "train" and r["phase"] == "u2pl"]
    assert len(semi) == 3 and all(r["unsup"] > 0 and r["contra"] > 0 for r in semi)
    name = "step_00000004"
    shutil.copytree(tmp_path / "full" / "checkpoints" / name, tmp_path / "resumed" / "checkpoints" / name)
    train(cfg(tmp_path / "resumed", "train.resume=auto"))
    last = "checkpoints/step_00000006/state.pt"
    assert state_digests(tmp_path / "resumed" / last) == state_digests(tmp_path / "full" / last)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_ranks_train_a_vit(demo_shards, tmp_path, engine):
    import subprocess
    import sys

    extra = ["engine.zero_stage=1"] if engine == "deepspeed" else []
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "--nproc", "2", "--config",
           str(REPO / "configs" / "demo_vit.yaml"), *TRAIN, f"engine.backend={engine}", *extra,
           f"train.run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2 and summary["backend"] == engine
    assert summary["queue_digests"][0] == summary["queue_digests"][1]  # the all-gathered queues agree


def test_hub_weights_unreachable_name_the_model_and_the_local_file_option(tmp_path):
    """Offline (the hub client's real offline mode, an empty cache): the error names the backbone and
    model.pretrained_path, instead of the hub client's generic message."""
    import subprocess
    import sys

    code = ("from u2pl_scale.config import load_config\nfrom u2pl_scale.model import build_model\n"
            "cfg = load_config('configs/demo_vit.yaml', ['model.pretrained=true', \"model.pretrained_path=\"])\n"
            "build_model(cfg.model, cfg.data.num_classes)\n")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode != 0
    backbone = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_vit.yaml").model.backbone
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: model.backbone=" + backbone) and "model.pretrained_path=" in last, last
