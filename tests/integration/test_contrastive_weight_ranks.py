"""method.contrastive.weight is an effective weight: the same gradient on 1 and on 2 gloo ranks (issue 20 item 1).

The published code all-reduces the contrastive value in place (no gradient) and divides it by the world size, so
its effective weight is 1/W of the written one. Here each rank's step loss enters DDP's gradient average as is.
Both ranks get the same batch and the same pre-filled queues, and no pixel qualifies as a new negative
(negative_threshold 0), so every rank computes the same step as the single process: any rescaling by the world
size would show as a different gradient.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from u2pl_scale.config import load_config
from u2pl_scale.engine.step import StepConfig, u2pl_step
from u2pl_scale.method.queues import ClassQueues
from u2pl_scale.model import build_model
from net import free_port

OVERRIDES = ["model.backbone=resnet10t", "model.head_channels=16", "model.low_level_channels=8", "model.rep_dim=8",
             "model.dropout=0.0", "method.cutmix_prob=0.0", "method.contrastive.negative_threshold=0.0",
             "method.contrastive.num_anchors=16", "method.contrastive.num_negatives=4",
             "method.contrastive.weight=0.25", "method.contrastive.anchor_threshold=0.0"]
REPO = Path(__file__).resolve().parents[2]


def _step_gradient(world_size: int, rank: int = 0) -> dict:
    """The representation head's gradient after one U2PL step (sup + 0.25 * contrastive) on this rank."""
    cfg = load_config(REPO / "configs" / "demo.yaml", OVERRIDES)
    torch.manual_seed(0)
    student = build_model(cfg.model, cfg.data.num_classes)
    teacher = build_model(cfg.model, cfg.data.num_classes)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    forward = student
    if world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(student)
    data = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randn(2, 3, 32, 32, generator=data), torch.randn(2, 3, 32, 32, generator=data)
    y_l = torch.randint(0, cfg.data.num_classes, (2, 32, 32), generator=data)
    queues = ClassQueues(cfg.data.num_classes, cfg.model.rep_dim, 64)
    rows = torch.nn.functional.normalize(torch.randn(6 * 32, cfg.model.rep_dim, generator=data), dim=1)
    queues.push(rows, torch.eye(6, dtype=torch.bool).repeat_interleave(32, dim=0))  # 32 rows per class
    sc = StepConfig.from_config(cfg)
    terms = u2pl_step(sc, forward, teacher, queues, x_l, y_l, x_u, torch.ones(2, 32, 32, dtype=torch.bool), 0.5,
                      contextlib.nullcontext, generator=torch.Generator().manual_seed(2))
    terms["loss"].backward()
    assert int(queues.fill.sum()) == 6 * 32  # nothing pushed: the ranks' queues stay the single process's
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if name.startswith("representation")}
    return {"grads": grads, "contra": float(terms["contra"]), "loss": float(terms["loss"].detach())}


def _rank_main(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        result = _step_gradient(world_size, rank)
        if rank == 0:
            torch.save(result, out)
    finally:
        torch.distributed.destroy_process_group()


def test_contrastive_gradient_is_the_same_on_one_and_two_ranks(tmp_path):
    single = _step_gradient(1)
    assert single["contra"] > 0  # the contrastive term is live
    assert any(g.abs().sum() > 0 for g in single["grads"].values())
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank_main, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    double = torch.load(out, weights_only=True)
    # equal up to float rounding (the ranks run on one thread each, the single process on more)
    assert double["contra"] == pytest.approx(single["contra"], rel=1e-5)
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for name, grad in single["grads"].items():
        # DDP averages the two equal rank gradients: the single process's gradient, not half of it
        assert torch.allclose(double["grads"][name], grad, rtol=1e-4, atol=1e-7), name
        assert not torch.allclose(double["grads"][name] * 2, grad, rtol=1e-2) or grad.abs().max() == 0  # not 1/W
