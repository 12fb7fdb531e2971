"""The published-layout backbone (U2PL_SPEC.md §1) and checked pretrained loading (u2pl_scale/model/backbone.py).

The reference network below is written from the published u2pl/models/resnet.py (ResNet-101 with
replace_stride_with_dilation [False, True, True] and multi_grid=True), independently of timm, so its state dict
carries the published tensor names and its forward pass the published layout.
"""
import pytest
import timm
import torch
import torch.nn as nn

from u2pl_scale.config import ConfigError, config_from_dict, load_config
from u2pl_scale.model.deeplab import DeepLabV3Plus, build_model

SMALL_HEAD = ["model.head_channels=16", "model.low_level_channels=16", "model.rep_dim=16"]


class RefBottleneck(nn.Module):
    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefResNet101(nn.Module):
    """The published deep-stem, multi-grid ResNet-101 with its ImageNet classifier."""

    def __init__(self):
        super().__init__()
        conv = lambda cin, cout, stride=1: nn.Conv2d(cin, cout, 3, stride, 1, bias=False)  # noqa: E731
        self.conv1 = nn.Sequential(conv(3, 64, 2), nn.BatchNorm2d(64), nn.ReLU(), conv(64, 64), nn.BatchNorm2d(64),
                                   nn.ReLU(), conv(64, 128))
        self.bn1 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.inplanes, self.dilation = 128, 1
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 23, stride=2, dilate=True)
        self.layer4 = self._make_layer(512, 3, stride=2, dilate=True, grids=(2, 2, 4))
        self.fc = nn.Linear(2048, 1000)

    def _make_layer(self, planes, blocks, stride=1, dilate=False, grids=None):
        grids = grids or (1,) * blocks
        previous = self.dilation
        if dilate:
            self.dilation, stride = self.dilation * stride, 1
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [RefBottleneck(self.inplanes, planes, stride, previous * grids[0], downsample)]
        self.inplanes = planes * 4
        layers += [RefBottleneck(self.inplanes, planes, 1, self.dilation * grids[i]) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


# PSPNet-style deep-base checkpoints name the same stem tensors differently.
PSPNET_STEM = {"conv1.0.": "conv1.", "conv1.1.": "bn1.", "conv1.3.": "conv2.", "conv1.4.": "bn2.", "conv1.6.": "conv3.",
               "bn1.": "bn3."}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The reference network with random BN statistics, saved as the published checkpoint would be."""
    torch.manual_seed(0)
    ref = RefResNet101().eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.1, 0.5)
            m.bias.data.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("published") / "resnet101.pth"
    state = ref.state_dict()
    torch.save(state, path)
    return ref, state, path


@pytest.fixture(scope="module")
def loaded(published):
    _, _, path = published
    cfg = load_config("configs/voc_1464.yaml", [f"model.pretrained_path={path}"] + SMALL_HEAD)
    return build_model(cfg.model, cfg.data.num_classes).eval()


def test_published_layout_dilations_stem_and_strides(loaded):
    bb = loaded.backbone
    assert [b.conv2.dilation for b in bb.layer4] == [(4, 4), (8, 8), (16, 16)]
    assert [b.conv2.padding for b in bb.layer4] == [(4, 4), (8, 8), (16, 16)]
    assert [b.conv2.dilation[0] for b in bb.layer3] == [1] + [2] * 22
    assert bb.maxpool.ceil_mode
    stem = [bb.conv1[0], bb.conv1[3], bb.conv1[6]]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in stem] == [(3, 64, 2), (64, 64, 1), (64, 128, 1)]
    assert bb.bn1.num_features == 128 and bb.layer1[0].conv1.in_channels == 128
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 65, 65))
        # 65 -> stem conv (k3 s2 p1) 33 -> max-pool (k3 s2 p1) 17 (stride 4) -> layer2 (k3 s2 p1) 9 (stride 8)
        low, high = feats[loaded.low_index], feats[loaded.high_index]
        assert low.shape == (1, 256, 17, 17) and high.shape == (1, 2048, 9, 9)
        assert feats[loaded.aux_index].shape == (1, 1024, 9, 9)
        # an even stem output is where ceil_mode matters: 64 -> 32 -> 17 (published) instead of 16
        assert bb(torch.randn(1, 3, 64, 64))[loaded.low_index].shape[-1] == 17
        bb.maxpool.ceil_mode = False
        try:
            assert bb(torch.randn(1, 3, 64, 64))[loaded.low_index].shape[-1] == 16
        finally:
            bb.maxpool.ceil_mode = True


def test_published_checkpoint_loads_completely_and_computes_the_published_features(published, loaded):
    ref, state, _ = published
    own = loaded.backbone.state_dict()
    assert set(own) == set(state) - {"fc.weight", "fc.bias"}  # the published names are timm's
    assert all(torch.equal(own[k], state[k]) for k in own)
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        ref_low, ref_high = ref(x)
        feats = loaded.backbone(x)
    for ours, theirs in ((feats[loaded.low_index], ref_low), (feats[loaded.high_index], ref_high)):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_pspnet_stem_names_and_wrapper_prefixes_are_mapped(published, tmp_path, capsys):
    _, state, _ = published

    def rename(key):
        head = next((p for p in PSPNET_STEM if key.startswith(p)), None)
        return PSPNET_STEM[head] + key[len(head):] if head else key

    path = tmp_path / "pspnet_style.pth"
    torch.save({"state_dict": {"module.encoder." + rename(k): v for k, v in state.items()}}, path)
    assert "module.encoder.conv3.weight" in torch.load(path, weights_only=True)["state_dict"]
    cfg = load_config("configs/voc_1464.yaml", [f"model.pretrained_path={path}"] + SMALL_HEAD)
    own = build_model(cfg.model, 21).backbone.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)
    out = capsys.readouterr().out
    assert "loaded" in out and "module.encoder.fc.weight" in out and "module.encoder.fc.bias" in out


@pytest.fixture
def timm_file(tmp_path):
    """A complete ImageNet-style checkpoint (timm's names, with the classifier) of a small deep-stem ResNet."""
    torch.manual_seed(1)
    state = timm.create_model("resnet10t").state_dict()
    assert "conv1.4.running_var" in state and "fc.weight" in state

    def save(name, **changes):
        path = tmp_path / name
        torch.save({k: v for k, v in {**state, **changes}.items() if v is not None}, path)
        return path
    return state, save


def build_small(path, *extra):
    cfg = load_config(None, ["model.backbone=resnet10t", "model.pretrained=true", f"model.pretrained_path={path}",
                             "data.num_classes=6", *SMALL_HEAD, *extra])
    return build_model(cfg.model, 6)


def test_complete_file_loads_and_the_classifier_is_reported_not_an_error(timm_file, capsys):
    state, save = timm_file
    own = build_small(save("full.pth")).backbone.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)
    out = capsys.readouterr().out
    assert "fc.weight" in out and "fc.bias" in out


def test_missing_extra_and_misshaped_tensors_are_errors_naming_them(timm_file):
    _, save = timm_file
    with pytest.raises(ValueError, match=r"model\.pretrained_path.*1 backbone tensors not in the file.*"
                                         r"conv1\.4\.running_var"):
        build_small(save("missing.pth", **{"conv1.4.running_var": None}))
    with pytest.raises(ValueError, match=r"1 file tensors not used: decoder\.head\.weight"):
        build_small(save("extra.pth", **{"decoder.head.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"wrong shape: bn1\.weight \(file \[7\] vs model \[64\]\)"):
        build_small(save("shape.pth", **{"bn1.weight": torch.ones(7)}))


def test_allow_partial_load_warns_with_the_same_lists_and_builds(timm_file):
    state, save = timm_file
    path = save("partial.pth", **{"conv1.3.weight": None, "decoder.head.weight": torch.zeros(3)})
    with pytest.warns(UserWarning, match=r"conv1\.3\.weight.*decoder\.head\.weight"):
        model = build_small(path, "model.allow_partial_load=true")
    own = model.backbone.state_dict()
    assert torch.equal(own["conv1.0.weight"], state["conv1.0.weight"])
    assert not torch.equal(own["conv1.3.weight"], state["conv1.3.weight"])  # left at its random init


def test_timm_hub_load_is_checked_the_same_way(timm_file, monkeypatch):
    """timm loads features_only weights non-strictly; a local file stands in for the hub download."""
    state, save = timm_file
    files = {"hub": save("hub.pth")}
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: create(
        *a, **kw, **({"pretrained_cfg_overlay": {"file": str(files["hub"])}} if kw.get("pretrained") else {})))
    own = DeepLabV3Plus("resnet10t", 6, pretrained=True, head_channels=16, low_level_channels=16,
                        rep_dim=16).backbone.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)
    files["hub"] = save("hub_missing.pth", **{"layer1.0.bn2.weight": None})
    with pytest.raises(ValueError, match=r"model\.pretrained.*layer1\.0\.bn2\.weight"):
        DeepLabV3Plus("resnet10t", 6, pretrained=True, head_channels=16, low_level_channels=16, rep_dim=16)


def test_multi_grid_validation():
    for bad in ([4, 0, 16], [4, "8", 16], [True, 8, 16]):
        with pytest.raises(ConfigError, match=r"model\.multi_grid"):
            config_from_dict({"model": {"multi_grid": bad}})
    with pytest.raises(ConfigError, match=r"model\.multi_grid"):
        config_from_dict({"model": {"multi_grid": 4}})
    small = dict(num_classes=5, head_channels=16, low_level_channels=16, rep_dim=16)
    with pytest.raises(ValueError, match=r"model\.multi_grid: .* 2 blocks in its last stage 'layer4', got 3"):
        DeepLabV3Plus("resnet26", multi_grid=[4, 8, 16], **small)
    with pytest.raises(ValueError, match=r"model\.multi_grid: .*no ResNet bottleneck stage"):
        DeepLabV3Plus("resnet18", multi_grid=[4, 8], **small)
    with pytest.raises(ValueError, match=r"model\.multi_grid: .*no ResNet bottleneck stage"):
        DeepLabV3Plus("mobilenetv3_small_050", multi_grid=[4, 8, 16], **small)
    with pytest.raises(ValueError, match=r"model\.stem_ceil_mode"):
        DeepLabV3Plus("mobilenetv3_small_050", stem_ceil_mode=True, **small)
    # [] keeps timm's dilations
    assert [b.conv2.dilation[0] for b in DeepLabV3Plus("resnet26", **small).backbone.layer4] == [2, 4]
