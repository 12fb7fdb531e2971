import math

import pytest

from u2pl_scale.config import ConfigError, derive, load_config, queue_capacities


def test_published_defaults_present():
    cfg = load_config(None)
    assert cfg.data.ignore_index == 255
    assert cfg.data.crop_size == 513 and cfg.data.scale_range == [0.5, 2.0]
    assert cfg.model.aspp_dilations == [12, 24, 36] and cfg.model.rep_dim == 256
    c = cfg.method.contrastive
    assert (c.anchor_threshold, c.negative_threshold, c.low_rank, c.high_rank) == (0.3, 1.0, 3, 20)
    assert (c.num_anchors, c.num_negatives, c.temperature) == (256, 50, 0.5)
    assert cfg.method.ema_decay == 0.99 and cfg.method.drop_percent_start == 20.0
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.001, 0.9, 1e-4)
    assert queue_capacities(cfg)[:2] == [50000, 30000] and len(queue_capacities(cfg)) == 21


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config("configs/demo.yaml", ["train.epochs=3", "method.contrastive.temperature=0.2",
                                            "data.scale_range=[0.5,1.0]", "train.channels_last=false"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.method.contrastive.temperature == 0.2
    assert cfg.data.scale_range == [0.5, 1.0]
    assert cfg.train.channels_last is False


@pytest.mark.parametrize("override, culprit", [
    ("train.epochz=3", "train.epochz"),
    ("method.contrastive.temprature=0.2", "method.contrastive.temprature"),
    ("train.epochs=three", "train.epochs"),
    ("train.precision=fp8", "train.precision"),
    ("data.ignore_index=3", "data.ignore_index"),
    ("method.contrastive.low_rank=30", "method.contrastive.low_rank"),
    ("optim.name=adam", "optim.name"),
])
def test_bad_keys_and_values_name_the_culprit(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        load_config("configs/demo.yaml", [override])


def test_override_of_a_section_absent_from_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("engine:\ntrain:\n  epochs: 2\n")
    cfg = load_config(p, ["engine.backend=deepspeed", "eval.mode=sliding"])
    assert cfg.engine.backend == "deepspeed" and cfg.eval.mode == "sliding" and cfg.train.epochs == 2


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  backbone: resnet18\n  headz: 3\n")
    with pytest.raises(ConfigError, match=r"model\.headz"):
        load_config(p)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_derived_steps_and_lr_scaling():
    # VOC classic 1464: 9118 unlabeled / (4 GPUs x 4) = 570 steps per epoch (U2PL_SPEC.md §7)
    cfg = load_config("configs/voc_1464.yaml")
    d = derive(cfg, world_size=4, unlabeled_size=9118)
    assert d.steps_per_epoch == math.ceil(9118 / 16) == 570
    assert d.total_steps == 570 * 80
    assert d.lr == pytest.approx(0.001)  # published 4 x 4 batch keeps the published lr
    assert d.sup_only_steps == 570
    d8 = derive(cfg, world_size=8, unlabeled_size=9118)
    assert d8.steps_per_epoch == math.ceil(9118 / 32)
    assert d8.lr == pytest.approx(0.002)  # linear rule: 8 x 4 / 16
    # the published loader: DistributedSampler gives each rank ceil(N / W) samples, drop_last keeps full batches.
    # Cityscapes 744: 2231 unlabeled on 8 GPUs x 2 -> 279 per rank -> 139 steps (ceil(2231 / 16) would be 140)
    city = derive(load_config("configs/cityscapes_744.yaml"), world_size=8, unlabeled_size=2231)
    assert city.steps_per_epoch == 139
    capped = derive(load_config("configs/voc_1464.yaml", ["train.max_steps=20"]), 4, 9118)
    assert capped.total_steps == 20


def test_every_shipped_config_loads():
    import glob
    files = sorted(glob.glob("configs/*.yaml"))
    assert len(files) >= 14
    for f in files:
        load_config(f)
