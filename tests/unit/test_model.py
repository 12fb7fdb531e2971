import pytest
import torch

from u2pl_scale.model.deeplab import DeepLabV3Plus, convert_sync_bn


def small(**kw):
    args = dict(backbone="resnet18", num_classes=5, head_channels=32, low_level_channels=16, rep_dim=24,
                aspp_dilations=(2, 4, 6))
    args.update(kw)
    return DeepLabV3Plus(**args)


def test_outputs_at_stride_four_with_rep_and_aux():
    model = small(aux_head=True).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["pred"].shape == (2, 5, 16, 16)
    assert out["rep"].shape == (2, 24, 16, 16)
    assert out["aux"].shape == (2, 5, 8, 8)  # stage-3 feature at output stride 8


def test_head_follows_spec_layout():
    model = DeepLabV3Plus("resnet50", num_classes=21)
    # ASPP: pooling + 1x1 + three 3x3 branches with dilations 12/24/36 on the 2048-ch feature
    dil = [b[0].dilation[0] for b in model.aspp.branches[1:]]
    assert dil == [12, 24, 36]
    assert model.aspp.branches[0][0].in_channels == 2048
    assert model.aspp.fuse[0][0].in_channels == 5 * 256
    assert model.low_level[0].in_channels == 256 and model.low_level[0].out_channels == 256
    assert model.classifier[0][0].in_channels == 512 and model.classifier[-1].out_channels == 21
    assert model.representation[-1].out_channels == 256


def test_pretrained_weights_from_local_file(tmp_path):
    source = small()
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": {"module.backbone." + k: v for k, v in source.backbone.state_dict().items()}}, path)
    target = small(pretrained=True, pretrained_path=str(path))
    for (k, a), b in zip(source.backbone.state_dict().items(), target.backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_local_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        small(pretrained=True, pretrained_path=str(tmp_path / "nothere.pth"))


def test_sync_bn_conversion_is_a_noop_without_a_group():
    model = small()
    assert convert_sync_bn(model, True, torch.device("cuda")) is model
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(small())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
