"""Method inputs shared by the method-path tests (tests/integration/test_compile_method.py,
test_graphed_method.py, tests/unit/test_accel_triton.py, tests/gpu/test_gpu.py): a small step config, student/teacher
outputs with full queues, larger queues, and the two-rank split of the graphed method played in one process."""
from pathlib import Path

import torch

from u2pl_scale.config import load_config
from u2pl_scale.engine.step import StepConfig
from u2pl_scale.method.queues import ClassQueues
from u2pl_scale.method.stages import REFERENCE, Stages

REPO = Path(__file__).resolve().parents[2]
CLASSES, DIM, CROP, FEAT = 5, 16, 33, 9
CAPACITIES = [40] + [30] * (CLASSES - 1)


def step_config(stages: Stages = REFERENCE) -> StepConfig:
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.num_classes={CLASSES}", "train.compile_method=true",
                                                       "method.contrastive.num_anchors=8",
                                                       "method.contrastive.num_negatives=6"])
    return StepConfig.from_config(cfg, stages)


def make_inputs(seed: int, queue_seed: int, num_labeled: int = 2, num_unlabeled: int = 2,
                stages: Stages = REFERENCE):
    """Student/teacher outputs as method_losses receives them, and full queues (written by `stages`' write) with
    their pointers mid-ring."""
    gen = torch.Generator().manual_seed(seed)
    batch = num_labeled + num_unlabeled
    pred = torch.randn(batch, CLASSES, FEAT, FEAT, generator=gen).requires_grad_()
    rep = torch.randn(batch, DIM, FEAT, FEAT, generator=gen).contiguous(memory_format=torch.channels_last)
    rep.requires_grad_()
    y_l = torch.randint(0, CLASSES, (num_labeled, CROP, CROP), generator=gen)
    y_l[:, :3] = 255
    logits_u_t = 3 * torch.randn(num_unlabeled, CLASSES, CROP, CROP, generator=gen)
    pseudo_u = logits_u_t.argmax(1)
    pseudo_u[:, -2:] = 255
    prob_t = torch.softmax(3 * torch.randn(batch, CLASSES, FEAT, FEAT, generator=gen), 1)
    rep_t = torch.randn(batch, DIM, FEAT, FEAT, generator=gen).contiguous(memory_format=torch.channels_last)
    queues = ClassQueues(CLASSES, DIM, CAPACITIES, write=stages.queue_write)
    gen = torch.Generator().manual_seed(queue_seed)  # the same on every rank, as the queues are in training
    queues.buffer.copy_(torch.nn.functional.normalize(torch.randn(queues.buffer.shape, generator=gen), dim=1))
    queues.fill.copy_(queues.capacities)
    queues.write_ptr.copy_((torch.rand(CLASSES, generator=gen) * queues.capacities).long())
    queues.buffer[-1] = 0  # the scratch row, which only the compacted write's padding touches
    return pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues


def big_queues(stages: Stages = REFERENCE):
    """Queues larger than one step's push (the test helper's small ones are overwritten whole by every push,
    which would hide pushes that should not have happened), full, pointers mid-ring."""
    gen = torch.Generator().manual_seed(7)
    queues = ClassQueues(CLASSES, DIM, [1200] + [1000] * (CLASSES - 1), write=stages.queue_write)
    queues.buffer.copy_(torch.nn.functional.normalize(torch.randn(queues.buffer.shape, generator=gen), dim=1))
    queues.buffer[-1] = 0
    queues.fill.copy_(queues.capacities)
    queues.write_ptr.copy_((torch.rand(CLASSES, generator=gen) * queues.capacities).long())
    return queues


def duplicate_rows(out: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """A two-rank all-gather in one process: the other rank sent the same rows."""
    out[: packed.shape[0]].copy_(packed)
    out[packed.shape[0]:].copy_(packed)
    return out


def split_parts():
    from u2pl_scale.engine.graphed import MethodParts
    from u2pl_scale.engine.step import method_after_push, method_before_push

    return MethodParts(method_before_push, method_after_push, gather=duplicate_rows)


def eager_with_duplicated_push(sc):
    """The eager method as it runs at world size 2 when the other rank sends the same rows."""
    from u2pl_scale.engine.step import method_after_push, method_before_push

    def run(inputs, queues, progress):
        unsup, reliable, prepared = method_before_push(sc, *inputs, queues, progress)
        packed = queues.pack(prepared.push_rows, prepared.push_mask)
        queues.push_packed(torch.cat([packed, packed]))
        return unsup, method_after_push(sc, inputs[1], prepared, queues), reliable

    return run
