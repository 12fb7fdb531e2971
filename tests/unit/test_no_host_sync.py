"""No host synchronisation inside the training step with the reference stages (what a GPU runs), checked without
a GPU.

The step runs on the "meta" device (tensors without data, so reading a value raises) under
tests/helpers/sync_audit.py, which also records ops that would sync a CUDA stream or copy host data to the device.
The meta device takes the reference stages (u2pl_scale.accel.select), as CUDA does but for its Triton kernels. tests/gpu/test_gpu.py
checks the same on a real GPU with torch.cuda.set_sync_debug_mode("error") when one is present.
"""
import contextlib
from pathlib import Path

import pytest
import torch

from sync_audit import SyncAudit
from u2pl_scale.config import load_config
from u2pl_scale.data.transforms import normalize
from u2pl_scale.engine.guard import StepGuard
from u2pl_scale.engine.optim import build_optimizer, build_scheduler
from u2pl_scale.engine.step import StepConfig, supervised_step, u2pl_step
from u2pl_scale.method import ema
from u2pl_scale.method.queues import ClassQueues
from u2pl_scale.model import build_model

REPO = Path(__file__).resolve().parents[2]
META = torch.device("meta")


def test_the_audit_finds_planted_syncs():
    x = torch.empty(4, device=META)
    with SyncAudit() as audit:
        torch.as_tensor([1.0, 2.0], device=META)  # host data onto the device
        torch.zeros(3).to(META)  # blocking host-to-device copy
        torch.zeros(3).to(META, non_blocking=True)  # pinned-style async copy: allowed
        x * 2.0  # plain device arithmetic: allowed
    assert [op for op, _ in audit.found] == ["torch.as_tensor of host data onto the device", "aten._to_copy.default"]
    with pytest.raises(Exception):  # value reads cannot run on meta at all
        with SyncAudit():
            (x > 0).any().item()


def _batch(batch: int, crop: int, num_classes: int):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, batch, 3, crop, crop), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, num_classes, (batch, crop, crop), dtype=torch.uint8, generator=gen)
    return images[0], labels, images[1], torch.ones(batch, crop, crop, dtype=torch.bool)


@pytest.mark.parametrize("phase", ["sup-only", "u2pl", "u2pl-hue"])
def test_a_training_step_on_the_device_path_never_syncs(phase):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["method.contrastive.queue_size=500",
                                                       f"method.hue_jitter={0.5 if phase == 'u2pl-hue' else 0}"])
    num_classes = cfg.data.num_classes
    student = build_model(cfg.model, num_classes).to(META).to(memory_format=torch.channels_last)
    teacher = build_model(cfg.model, num_classes).to(META).to(memory_format=torch.channels_last)
    queues = ClassQueues(num_classes, cfg.model.rep_dim, 500, device=META)
    optimizer = build_optimizer(student, cfg.optim, cfg.optim.lr, META)
    scheduler = build_scheduler(optimizer, 100, cfg.optim.poly_power)
    sc = StepConfig.from_config(cfg)
    image_l, label_l, image_u, valid_u = _batch(2, 32, num_classes)
    # the non-finite guard as a GPU with a fused optimiser runs it (its found_inf kernel aside: no meta kernel)
    guard = StepGuard((student, teacher), optimizer, META, 1, 20, history=4)
    guard.device_side = True

    def step(steps_since_copy: int) -> None:
        guard.begin(steps_since_copy, ["key"])
        # the trainer's prepare(): pinned batches go to the device without blocking
        x_l = normalize(image_l.to(META, non_blocking=True), cfg.data.mean, cfg.data.std, True)
        y_l = label_l.to(META, non_blocking=True).long()
        if phase.startswith("u2pl"):
            x_u = normalize(image_u.to(META, non_blocking=True), cfg.data.mean, cfg.data.std, True)
            valid = valid_u.to(META, non_blocking=True)
            terms = u2pl_step(sc, student, teacher, queues, x_l, y_l, x_u, valid, 0.3, contextlib.nullcontext)
        else:
            terms = supervised_step(sc, student, x_l, y_l, contextlib.nullcontext)
        terms["loss"].backward()
        guard.check(terms["loss"], student.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        assert not guard.skip_on_host()
        ema.update_(teacher, student, steps_since_copy, cfg.method.ema_decay, gate=guard.ema_gate())
        guard.end(steps_since_copy)

    step(0)  # warm-up: per-process constants (normalisation stats, resize indices) are copied once, here
    with SyncAudit() as audit:
        step(1)
        step(2)
    assert audit.found == []
