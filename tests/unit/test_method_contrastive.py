"""Contrastive loss: masks worked by hand, slow per-pixel / per-class references given the same sampled indices
(U2PL_SPEC.md section 6)."""

import pytest
import torch
import torch.nn.functional as F

from u2pl_scale.method.contrastive import contrastive_inputs, contrastive_loss, contrastive_masks
from u2pl_scale.method.queues import ClassQueues


def toy_case():
    """1 labeled + 1 unlabeled image, 2x2 pixels, 2 classes; pixel p = n*4 + y*2 + x."""
    q0 = torch.tensor([[0.8, 0.6, 0.1, 0.7], [0.95, 0.25, 0.45, 0.6]])
    prob = torch.stack([q0, 1 - q0], dim=1).reshape(2, 2, 2, 2)
    labels = torch.tensor([[0, 1, 1, 255], [0, 0, 1, 1]]).reshape(2, 2, 2)
    low = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool).reshape(2, 2, 2)
    high = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool).reshape(2, 2, 2)
    return prob, labels, low, high


def pixels(mask_nc_hw, cls):
    """Set of flat pixel indices p where mask[n, cls, s] is True."""
    n, _, hw = mask_nc_hw.shape
    return {i * hw + s for i in range(n) for s in range(hw) if mask_nc_hw[i, cls, s]}


def test_toy_masks_worked_by_hand():
    prob, labels, low, high = toy_case()
    masks = contrastive_masks(prob, labels, low, high, num_labeled=1, low_rank=1, high_rank=2)
    assert pixels(masks.label_low, 0) == {0, 4, 5} and pixels(masks.label_low, 1) == {1, 2}
    # anchors need q_c > 0.3: pixel 5 (q0 = 0.25) is not one
    assert pixels(masks.anchor, 0) == {0, 4} and pixels(masks.anchor, 1) == {1, 2}
    # labeled: top-1 class that is not the label (pixel 1: top 0, label 1); unlabeled: the 2nd-ranked class
    assert pixels(masks.negative, 0) == {1, 6} and pixels(masks.negative, 1) == {7}


def test_toy_push_happens_before_sampling_and_loss_matches_hand_reference(method_path):
    prob, labels, low, high = toy_case()
    gen = torch.Generator().manual_seed(0)
    rep = torch.randn(2, 4, 2, 2, generator=gen, requires_grad=True)
    rep_teacher = torch.randn(2, 4, 2, 2, generator=gen)
    queues = ClassQueues(2, 4, [5, 5], write=method_path.queue_write)
    out = contrastive_loss(rep, rep_teacher, prob, labels, low, high, 1, queues, low_rank=1, high_rank=2,
                           num_anchors=6, num_negatives=3, generator=gen, stages=method_path)
    teacher_rows = F.normalize(rep_teacher.permute(0, 2, 3, 1).reshape(8, 4), dim=1)
    assert torch.allclose(queues.class_features(0), teacher_rows[[1, 6]])
    assert torch.allclose(queues.class_features(1), teacher_rows[[7]])
    assert out.num_present.item() == 2 and out.class_used.tolist() == [True, True]
    rows = rep.permute(0, 2, 3, 1).reshape(8, 4)
    teacher_raw = rep_teacher.permute(0, 2, 3, 1).reshape(8, 4)
    prototype_pixels = {0: [0, 4, 5], 1: [1, 2]}
    anchor_pixels = {0: {0, 4}, 1: {1, 2}}
    queue_rows = {0: teacher_rows[[1, 6]], 1: teacher_rows[[7]]}
    expected = 0.0
    for c in range(2):
        assert set(out.anchor_index[c].tolist()) <= anchor_pixels[c]
        slots = out.negative_index[c] - queues.offsets[c]
        assert ((slots >= 0) & (slots < len(queue_rows[c]))).all()
        anchors = rows[out.anchor_index[c]]
        prototype = teacher_raw[prototype_pixels[c]].mean(0)
        negatives = queue_rows[c][slots].reshape(6, 3, 4)
        keys = torch.cat([prototype.expand(6, 1, 4), negatives], dim=1)
        logits = torch.cosine_similarity(anchors[:, None, :], keys, dim=2) / 0.5
        expected = expected + F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    expected = expected / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert rep.grad.abs().sum() > 0


def slow_masks(prob, labels, low, high, num_labeled, c, low_rank, high_rank):
    """Per-pixel loops over the published definitions; returns sets of flat pixel indices for class c."""
    n, classes, h, w = prob.shape
    label_low, anchor, negative = set(), set(), set()
    for i in range(n):
        for y in range(h):
            for x in range(w):
                p = i * h * w + y * w + x
                q = prob[i, :, y, x].tolist()
                order = sorted(range(classes), key=lambda k: -q[k])
                label = int(labels[i, y, x])
                if label == c and low[i, y, x]:
                    label_low.add(p)
                    if q[c] > 0.3:
                        anchor.add(p)
                if high[i, y, x] and q[c] < 1.0:
                    if i < num_labeled:
                        if c in order[:low_rank] and c != label:
                            negative.add(p)
                    elif c in order[low_rank:high_rank]:
                        negative.add(p)
    return label_low, anchor, negative


def test_masks_with_tied_probabilities_match_the_slow_reference(method_path):
    """Values from a set of four, so most pixels have ties at the rank boundaries: ties rank the lower class
    first with both stages (the CPU's rounds over values with the tied pixels redone from keys; the reference's
    stable sort)."""
    gen = torch.Generator().manual_seed(11)
    classes, h, w, low_rank, high_rank = 7, 6, 5, 3, 5
    prob = torch.tensor([0.1, 0.2, 0.4, 0.5])[torch.randint(0, 4, (4, classes, h, w), generator=gen)]  # not 0.3:
    # the anchor threshold compares in fp32 here and in float64 in the reference
    labels = torch.randint(0, classes, (4, h, w), generator=gen)
    labels[1, 0] = 255
    low = torch.rand(4, h, w, generator=gen) < 0.6
    high = torch.rand(4, h, w, generator=gen) < 0.7
    masks = contrastive_masks(prob, labels, low, high, 2, low_rank=low_rank, high_rank=high_rank, stages=method_path)
    ties = 0
    for c in range(classes):
        label_low, anchor, negative = slow_masks(prob, labels, low, high, 2, c, low_rank, high_rank)
        assert pixels(masks.label_low, c) == label_low and pixels(masks.anchor, c) == anchor
        assert pixels(masks.negative, c) == negative, c
    for q in prob.permute(0, 2, 3, 1).reshape(-1, classes).tolist():
        ranked = sorted(q, reverse=True)
        ties += ranked[low_rank - 1] == ranked[low_rank] or ranked[high_rank - 1] == ranked[high_rank]
    assert ties > 60  # of 120 pixels: the boundaries are tied often


def test_random_case_matches_slow_reference_with_the_same_indices(method_path):
    gen = torch.Generator().manual_seed(7)
    classes, dim, h, w, low_rank, high_rank = 6, 8, 5, 6, 2, 5
    prob = torch.softmax(2 * torch.randn(4, classes, h, w, generator=gen), dim=1)
    labels = torch.randint(0, 4, (4, h, w), generator=gen)  # classes 4, 5 never labelled
    labels[0, 0] = 255
    low = (torch.rand(4, h, w, generator=gen) < 0.6) & (labels != 255)
    high = (torch.rand(4, h, w, generator=gen) < 0.5) & (labels != 255)
    rep = torch.randn(4, dim, h, w, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    rep_teacher = torch.randn(4, dim, h, w, generator=gen)
    queues = ClassQueues(classes, dim, [40, 7, 9, 30, 5, 6], write=method_path.queue_write)
    old = F.normalize(torch.randn(3, dim, generator=gen), dim=1)
    queues.push(old, torch.tensor([[0, 0, 1, 0, 0, 0]] * 3, dtype=torch.bool))
    old_fill = queues.fill.clone()

    out = contrastive_loss(rep, rep_teacher, prob, labels, low, high, 2, queues, low_rank=low_rank,
                           high_rank=high_rank, num_anchors=7, num_negatives=3, temperature=0.5, generator=gen,
                           stages=method_path)

    rows = rep.permute(0, 2, 3, 1).reshape(-1, dim)  # with grad, for the gradient check below
    teacher_rows = rep_teacher.permute(0, 2, 3, 1).reshape(-1, dim)
    masks = contrastive_masks(prob, labels, low, high, 2, low_rank=low_rank, high_rank=high_rank, stages=method_path)
    present, terms = 0, []
    for c in range(classes):
        label_low, anchor, negative = slow_masks(prob, labels, low, high, 2, c, low_rank, high_rank)
        assert pixels(masks.label_low, c) == label_low and pixels(masks.anchor, c) == anchor
        assert pixels(masks.negative, c) == negative
        # the push appended this step's negatives, in pixel order, after what was there
        assert int(queues.fill[c]) == min(int(old_fill[c]) + len(negative), queues.capacity_list[c])
        if not label_low:
            continue
        present += 1
        if not anchor or int(queues.fill[c]) == 0:
            assert not out.class_used[c]
            continue
        assert out.class_used[c]
        assert set(out.anchor_index[c].tolist()) <= anchor
        slots = out.negative_index[c] - queues.offsets[c]
        assert ((slots >= 0) & (slots < queues.fill[c])).all()
        prototype = teacher_rows[sorted(label_low)].mean(0)
        assert torch.allclose(out.prototypes[c], prototype, atol=1e-6)
        anchors = rows[out.anchor_index[c]]
        negatives = queues.buffer[out.negative_index[c]].reshape(7, 3, dim)
        keys = torch.cat([prototype.expand(7, 1, dim), negatives], dim=1)
        logits = torch.cosine_similarity(anchors[:, None, :], keys, dim=2) / 0.5
        terms.append(F.cross_entropy(logits, torch.zeros(7, dtype=torch.long)))
    assert present == out.num_present.item() and present >= 2 and len(terms) >= 2
    reference = sum(terms) / present
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    # the gradient w.r.t. the student features, through the anchor gather and normalisation
    (grad_reference,) = torch.autograd.grad(reference, rep)
    out.loss.backward()
    assert rep.grad.abs().sum() > 0
    torch.testing.assert_close(rep.grad, grad_reference, rtol=1e-5, atol=1e-6)
    for c in range(classes):  # this step's negatives are the newest rows of each queue
        _, _, negative = slow_masks(prob, labels, low, high, 2, c, low_rank, high_rank)
        newest = [tuple(r) for r in F.normalize(teacher_rows[sorted(negative)], dim=1).tolist()]
        newest = newest[-queues.capacity_list[c]:]
        stored = [tuple(r) for r in queues.class_features(c).tolist()]
        for row in newest:
            assert any(torch.allclose(torch.tensor(row), torch.tensor(s), atol=1e-6) for s in stored)


def test_fewer_than_two_classes_gives_zero_with_graph(method_path):
    gen = torch.Generator().manual_seed(1)
    prob = torch.softmax(torch.randn(2, 3, 3, 3, generator=gen), 1)
    labels = torch.zeros(2, 3, 3, dtype=torch.long)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    rep = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    queues = ClassQueues(3, 4, 10, write=method_path.queue_write)
    out = contrastive_loss(rep, torch.randn(2, 4, 3, 3, generator=gen), prob, labels, mask, mask, 1, queues,
                           num_anchors=4, num_negatives=2, generator=gen, stages=method_path)
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None and out.num_present.item() == 1
    out.loss.backward()
    assert torch.equal(rep.grad, torch.zeros_like(rep))


def test_contrastive_inputs_mark_labeled_pixels_low_and_high():
    labels_l = torch.tensor([[[0, 255], [1, 1]]])
    pseudo_u = torch.tensor([[[2, 2], [0, 1]]])
    low_u = torch.tensor([[[True, False], [False, True]]])
    high_u = ~low_u
    labels, low, high = contrastive_inputs(labels_l, pseudo_u, low_u, high_u, (2, 2))
    assert labels.tolist() == [[[0, 255], [1, 1]], [[2, 2], [0, 1]]]
    assert low.tolist() == [[[True, False], [True, True]], [[True, False], [False, True]]]
    assert high.tolist() == [[[True, False], [True, True]], [[False, True], [True, False]]]


def test_contrastive_loss_is_fp32_under_autocast(method_path):
    prob, labels, low, high = toy_case()
    gen = torch.Generator().manual_seed(0)
    rep = torch.randn(2, 4, 2, 2, generator=gen).bfloat16().requires_grad_()
    queues = ClassQueues(2, 4, [5, 5], write=method_path.queue_write)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = contrastive_loss(rep, torch.randn(2, 4, 2, 2, generator=gen).bfloat16(), prob, labels, low, high,
                               1, queues, low_rank=1, high_rank=2, num_anchors=4, num_negatives=2, generator=gen,
                               stages=method_path)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_top_mask_matches_a_sort_for_every_k_both_ways():
    """_top_mask (rounds of amax, complement for k > C/2, bit-inverted keys for the smallest) against the
    positions of a full sort per pixel, for every k, with negative and positive keys."""
    from u2pl_scale.accel.cpu import top_mask as _top_mask

    gen = torch.Generator().manual_seed(5)
    num_classes = 7
    keys = torch.randperm(3 * num_classes * 4, generator=gen).reshape(3, num_classes, 4) - 40  # unique
    order = torch.argsort(keys, dim=1, descending=True)  # class indices, largest key first
    for k in range(num_classes + 1):
        for largest in (True, False):
            chosen = order[:, :k] if largest else order[:, num_classes - k:]
            expected = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, chosen, True)
            assert torch.equal(_top_mask(keys, k, largest), expected), (k, largest)


def test_few_class_warning_names_what_the_loss_cannot_do():
    from u2pl_scale.method.diagnostics import few_class_warning
    assert few_class_warning(21, 3) is None and few_class_warning(6, 3) is None  # a cut window loses nothing
    text = few_class_warning(3, 3)
    assert "unlabeled pixels are never negatives" in text and "low_rank" in text
    assert few_class_warning(2, 1) is None
