"""The optimiser: backbone / head parameter groups with the head LR multiplier, SGD or AdamW, poly schedule."""
import pytest
import torch

from u2pl_scale.config import load_config
from u2pl_scale.engine.optim import build_optimizer, build_scheduler
from u2pl_scale.model import build_model


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_groups_carry_the_head_multiplier_and_weight_decay(name, cls):
    cfg = load_config("configs/demo.yaml", [f"optim.name={name}", "optim.lr=0.02", "optim.head_lr_multiplier=10",
                                            "optim.weight_decay=0.001"])
    model = build_model(cfg.model, cfg.data.num_classes)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr, torch.device("cpu"))
    assert type(optimizer) is cls
    backbone, head = optimizer.param_groups
    assert (backbone["lr"], head["lr"]) == (0.02, pytest.approx(0.2))
    assert backbone["weight_decay"] == head["weight_decay"] == 0.001
    n_backbone = sum(1 for n, _ in model.named_parameters() if n.startswith("backbone."))
    assert len(backbone["params"]) == n_backbone and len(head["params"]) == len(list(model.parameters())) - n_backbone
    # poly: lr_k = lr_0 * (1 - k / total) ** 0.9, by hand at k = 5 of 10
    scheduler = build_scheduler(optimizer, 10, 0.9)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert backbone["lr"] == pytest.approx(0.02 * 0.5 ** 0.9)


@pytest.mark.parametrize("autotune", [True, False])
def test_cudnn_benchmark_follows_the_config_on_cuda_and_is_left_alone_on_cpu(autotune):
    from u2pl_scale.precision import configure_cudnn
    cfg = load_config(None, [f"train.cudnn_benchmark={str(autotune).lower()}"])
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = not autotune
        configure_cudnn(torch.device("cpu"), cfg.train.cudnn_benchmark)
        assert torch.backends.cudnn.benchmark is (not autotune)
        configure_cudnn(torch.device("cuda"), cfg.train.cudnn_benchmark)  # sets the flag; needs no GPU
        assert torch.backends.cudnn.benchmark is autotune
    finally:
        torch.backends.cudnn.benchmark = before
