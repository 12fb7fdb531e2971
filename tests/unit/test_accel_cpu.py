"""The CPU stages (u2pl_scale/accel/cpu.py: chunked, host-side, reused buffers) against the plain PyTorch
formulations of the reference stages they replace (u2pl_scale/method)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from u2pl_scale.accel import cpu
from u2pl_scale.method.stages import REFERENCE
from u2pl_scale.method.losses import _ce_sum, unsup_loss_from_reliable
from u2pl_scale.method.queues import ClassQueues

# the package re-exports functions named like its modules (reliability), so import the modules explicitly
contrastive = importlib.import_module("u2pl_scale.method.contrastive")
reliability = importlib.import_module("u2pl_scale.method.reliability")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows so that every loop runs several blocks, with a ragged last one."""
    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 5 * 7 * 3)
    monkeypatch.setattr(cpu, "NEGATIVE_CHUNK_BYTES", 3 * 4 * 6 * 4)
    monkeypatch.setattr(contrastive, "CHUNK_BYTES", 3 * 4 * 6 * 4)


def test_chunked_entropy_matches_whole_tensor_formula(small_chunks, method_path):
    logits = 4 * torch.randn(2, 5, 11, 7, generator=torch.Generator().manual_seed(0))
    expected = reliability.entropy(torch.softmax(logits, dim=1))
    assert torch.allclose(method_path.entropy_from_logits(logits), expected, atol=1e-6)


def test_chunked_entropy_is_accurate_for_confident_pixels(small_chunks):
    """Entropies of near one-hot pixels (1e-12 .. 1e-3): the shifted form loses nothing to the logits' size.
    Its worst relative error (~6%, from log S with S just above 1) is well below the published formula's in
    fp32 (softmax, then log(p + eps): 65% here), which it replaces on CPU."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, 7, generator=gen)
    logits[:, 0] += 40 * torch.rand(2, 11, 7, generator=gen) + 100  # big logits, margins 7 .. 30
    logits[:, 1] += 70 + 23 * torch.rand(2, 11, 7, generator=gen)
    prob = torch.softmax(logits.double(), dim=1)
    exact = -(prob * prob.log()).sum(1)  # float64, no eps
    assert exact.min() < 1e-9 and exact.max() > 1e-4
    got = cpu.entropy_from_logits(logits).double()
    published = reliability.entropy(torch.softmax(logits, dim=1)).double()
    worst = ((got - exact).abs() / exact).max()
    assert worst < 0.1
    assert worst < ((published - exact).abs() / exact).max() / 5


def test_fused_unsup_ce_matches_cross_entropy_value_and_gradient(small_chunks, method_path):
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 5, 11, 7, generator=gen)).requires_grad_()
    target = torch.randint(0, 5, (2, 11, 7), generator=gen)
    target[0, :4] = 255
    target[1, 3, 2:] = 255
    kept = (target != 255).sum()
    fused = unsup_loss_from_reliable(logits, target, kept, torch.tensor(2 * 11 * 7), stages=method_path)
    (grad_fused,) = torch.autograd.grad(3 * fused, logits)
    reference = (2 * 11 * 7 / kept.float()) * (_ce_sum(logits, target, 255) / kept.float())
    (grad_reference,) = torch.autograd.grad(3 * reference, logits)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(grad_fused, grad_reference, atol=1e-7)
    assert torch.equal(grad_fused[0, :, :4], torch.zeros_like(grad_fused[0, :, :4]))


def test_rank_masks_follow_a_stable_sort_with_ties():
    prob = torch.tensor([[0.3, 0.3, 0.1, 0.3, 0.0, 0.0]]).reshape(1, 6, 1)  # ties at the top and the bottom
    prob = torch.cat([prob, torch.softmax(torch.randn(4, 6, 1), 1)])
    keys = cpu.rank_keys(prob)
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices  # ties: lower class first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(6)[None, :, None].expand_as(order))
    for k in range(7):
        assert torch.equal(cpu.top_mask(keys, k, largest=True), rank < k), k
        assert torch.equal(cpu.top_mask(keys, k, largest=False), rank >= 6 - k), k


def test_value_rank_masks_equal_a_stable_sort_including_tied_pixels():
    """The CPU masks from rounds over the values (ties redone from the keys) against a stable sort, on values
    quantised so that most pixels hold ties at some rank, plus untied pixels."""
    gen = torch.Generator().manual_seed(4)
    tied = torch.randint(0, 4, (3, 7, 50), generator=gen).float() / 4  # 4 levels over 7 classes: many ties
    untied = torch.softmax(torch.randn(3, 7, 50, generator=gen), 1)
    values = torch.cat([tied, untied], dim=2)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices  # ties: lower class first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(7)[None, :, None].expand_as(order))
    for k in range(8):
        assert torch.equal(cpu.value_top_mask(values, k, largest=True), rank < k), k
        assert torch.equal(cpu.value_top_mask(values, k, largest=False), rank >= 7 - k), k


def test_anchor_sampling_from_labels_picks_the_same_pixels_as_the_running_count():
    gen = torch.Generator().manual_seed(2)
    anchor_label = torch.randint(0, 5, (200,), generator=gen)  # 4 = no class; class 3 made empty below
    anchor_label[anchor_label == 3] = 4
    mask = anchor_label[None, :] == torch.arange(4)[:, None]
    index, count = contrastive.sample_anchor_index(mask, 9, torch.Generator().manual_seed(5))
    index2, count2 = contrastive.sample_anchor_index_from_labels(anchor_label, 4, 9, torch.Generator().manual_seed(5))
    assert torch.equal(count.long(), count2)
    assert torch.equal(index[:3], index2[:3])  # class 3 has no candidate: any index, the class is unused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_anchor_loss_matches_unfused_autograd(small_chunks, method_path, dtype):
    gen = torch.Generator().manual_seed(3)
    num_classes, num_anchors, num_negatives, dim = 3, 4, 6, 8
    queues = ClassQueues(num_classes, dim, [10, 7, 9], dtype=dtype)
    queues.buffer.copy_(F.normalize(torch.randn(queues.buffer.shape, generator=gen), dim=1))
    queues.fill.copy_(queues.capacities)
    index, _ = queues.sample_indices(num_anchors * num_negatives, generator=gen)
    anchors = torch.randn(num_classes, num_anchors, dim, generator=gen)
    anchors[1, 2] = 0  # a zero feature: F.normalize keeps it 0, with gradient (1 / 1e-12) x the unit's
    anchors.requires_grad_()
    prototypes = F.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    weight = torch.tensor([0.25, 0.0, 0.5])  # a class weight of 0: an unused class

    fused = contrastive._AnchorLoss.apply(anchors, prototypes, queues.buffer, index, 0.5, weight,
                                          method_path.anchor_negatives)
    (grad_fused,) = torch.autograd.grad(3 * fused, anchors)

    # the plain formulation, by autograd
    unit = F.normalize(anchors, dim=2)
    negatives = queues.buffer[index.reshape(-1)].reshape(num_classes * num_anchors, num_negatives, dim)
    flat = unit.reshape(-1, dim, 1)
    dots = torch.bmm(negatives, flat.to(dtype)).float()[:, :, 0]
    positive = (unit * prototypes[:, None, :]).sum(-1).reshape(-1, 1)
    logits = torch.cat([positive, dots], dim=1) / 0.5
    per_anchor = (torch.logsumexp(logits, dim=1) - logits[:, 0]).reshape(num_classes, num_anchors)
    reference = (per_anchor * weight[:, None]).sum()
    (grad_reference,) = torch.autograd.grad(3 * reference, anchors)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(fused, reference, atol=tol)
    assert torch.allclose(grad_fused, grad_reference, atol=tol)
    assert grad_fused[1].abs().sum() == 0 and grad_fused[0].abs().sum() > 0


def test_radix_select_equals_sorting():
    gen = torch.Generator().manual_seed(4)
    values = torch.cat([torch.randn(5000, generator=gen), torch.zeros(300), torch.full((7,), float("inf")),
                        -torch.rand(100, generator=gen) * 1e-30, torch.tensor([-0.0, 1e38, -1e38])])
    keys = cpu.order_keys(values)
    positions = torch.tensor([0, 1, 2500, 2501, 5000, 5100, 5409, 5409, 4999])
    assert torch.equal(cpu.select_keys(keys, positions), torch.sort(keys).values[positions])
    assert torch.equal(cpu.from_order_keys(keys), values)


def test_every_cpu_stage_returns_what_the_reference_stage_returns(small_chunks):
    """Each field of the CPU Stages against the same field of the reference Stages, on one random input each:
    masks and queue states equal, float results equal up to rounding, gradients too."""
    gen = torch.Generator().manual_seed(7)
    stages = cpu.cpu_stages()
    n, c, h, w, dim = 4, 6, 5, 7, 8
    logits = 3 * torch.randn(2, c, 11, 7, generator=gen)
    torch.testing.assert_close(stages.entropy_from_logits(logits), REFERENCE.entropy_from_logits(logits),
                               atol=1e-5, rtol=1e-5)
    values, valid = torch.randn(300, generator=gen), torch.rand(300, generator=gen) < 0.7
    for qs in ([0.0, 12.5, 80.0, 100.0], torch.tensor([3.0, 50.0])):
        got, expected = stages.percentiles_and_count(values, valid, qs), REFERENCE.percentiles_and_count(values,
                                                                                                         valid, qs)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    prob = torch.softmax(2 * torch.randn(n, c, h * w, generator=gen), 1)
    labels = torch.randint(0, c, (n, h * w), generator=gen)
    labels[0, :3] = 255
    high = torch.rand(n, h * w, generator=gen) < 0.6
    for low_rank, high_rank in ((1, 4), (2, 6), (3, 5)):
        got = stages.negative_mask(prob, labels, high, 2, low_rank, high_rank, 0.9)
        assert torch.equal(got, REFERENCE.negative_mask(prob, labels, high, 2, low_rank, high_rank, 0.9))
    rows = torch.randn(n * h * w, dim, generator=gen)
    rows[3] = 0
    label = torch.randint(0, c + 1, (n * h * w,), generator=gen)
    for queue_dtype in (torch.float32, torch.bfloat16):
        for got, expected in zip(stages.prototype_rows(rows, label, c, queue_dtype),
                                 REFERENCE.prototype_rows(rows, label, c, queue_dtype)):
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    features = torch.randn(n, dim, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    index = torch.randint(0, n * h * w, (13,), generator=gen)
    weights = torch.randn(13, dim, generator=gen)
    grads = []
    for implementation in (stages, REFERENCE):
        leaf = features.clone().requires_grad_()
        (implementation.gather_pixels(leaf, index) * weights).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    target = torch.randint(0, c, (2, 11, 7), generator=gen)
    target[1, :2] = 255
    scale = torch.tensor(0.37)
    ce = []
    for implementation in (stages, REFERENCE):
        leaf = logits.clone().requires_grad_()
        loss = implementation.scaled_ce_sum(leaf, target, 255, scale)
        (grad,) = torch.autograd.grad(2 * loss, leaf)
        ce.append((loss, grad))
    torch.testing.assert_close(ce[0][0], ce[1][0])
    torch.testing.assert_close(ce[0][1], ce[1][1])
    queues = [ClassQueues(c, dim, [7, 3, 9, 4, 5, 6], write=stage.queue_write) for stage in (stages, REFERENCE)]
    for _ in range(4):
        mask_cn = torch.rand(c, 20, generator=gen) < 0.4
        features_rows = torch.randn(20, dim, generator=gen)
        for q in queues:
            q.write(q, features_rows, mask_cn)
    for key, value in queues[0].state_dict().items():
        assert torch.equal(value[:-1] if key == "buffer" else value, queues[1].state_dict()[key][:-1]
                           if key == "buffer" else queues[1].state_dict()[key]), key
    queue = queues[0]
    negative_index, _ = queue.sample_indices(3 * 5)
    scaled = torch.randn(c * 3, 1, dim, generator=gen)
    prototypes = F.normalize(torch.randn(c, dim, generator=gen), dim=1)
    index = negative_index.reshape(c * 3, 5)
    for got, expected in zip(stages.anchor_negatives(scaled, prototypes, queue.buffer, index),
                             REFERENCE.anchor_negatives(scaled, prototypes, queue.buffer, index)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
