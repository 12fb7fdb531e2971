"""Unsupervised, OHEM and supervised losses against slow per-pixel references (U2PL_SPEC.md sections 4, 5)."""

import math

import numpy as np
import pytest
import torch

from u2pl_scale.method.losses import ohem_ce, sup_loss, unsup_loss
from u2pl_scale.method.reliability import alpha_t, reliability
from u2pl_scale.method.losses import unsup_loss_from_reliable


def pixel_ce(logits, b, y, x, label):
    row = [float(v) for v in logits[b, :, y, x]]
    top = max(row)
    return top + math.log(sum(math.exp(v - top) for v in row)) - row[label]


def reference_unsup(student, pseudo, teacher, drop):
    """The published compute_unsupervised_loss, pixel by pixel in float64, with ignored (padded) pseudo-labels
    counted nowhere: the published `B*H*W / kept` is `valid / kept` here (its batches have no ignored pixel)."""
    batch, classes, height, width = student.shape
    entropies, pixels = [], []
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                z = [float(v) for v in teacher[b, :, y, x]]
                m = max(z)
                e = [math.exp(v - m) for v in z]
                p = [v / sum(e) for v in e]
                h = -sum(pi * math.log(pi + 1e-10) for pi in p)
                if int(pseudo[b, y, x]) != 255:
                    entropies.append(h)
                pixels.append((b, y, x, h))
    thresh = np.percentile(np.array(entropies), 100 - drop)
    kept = [(b, y, x) for b, y, x, h in pixels if int(pseudo[b, y, x]) != 255 and not h >= thresh]
    ce = sum(pixel_ce(student, b, y, x, int(pseudo[b, y, x])) for b, y, x in kept) / len(kept)
    return len(entropies) / len(kept) * ce, len(kept) / len(entropies)


@pytest.mark.parametrize("drop", [20.0, 7.5, 0.0])
def test_unsup_loss_matches_published_reference(drop):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 5, 6, generator=gen, requires_grad=True)
    teacher = 2 * torch.randn(2, 4, 5, 6, generator=gen)
    pseudo = teacher.argmax(1)
    pseudo[0, 0, :4] = 255
    original = pseudo.clone()
    loss, ratio = unsup_loss(student, pseudo, teacher, drop)
    expected_loss, expected_ratio = reference_unsup(student.detach(), pseudo, teacher, drop)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert ratio.item() == pytest.approx(expected_ratio, rel=1e-6)
    assert torch.equal(pseudo, original)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_unsup_loss_from_reliability_matches_unsup_loss():
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 3, 4, 4, generator=gen)
    teacher = torch.randn(2, 3, 4, 4, generator=gen)
    pseudo = teacher.argmax(1)
    expected, _ = reference_unsup(student, pseudo, teacher, 12.0)
    rel = reliability(teacher, pseudo, drop_percent=12.0, alpha_t=alpha_t(0.3))
    got = unsup_loss_from_reliable(student, rel.reliable_labels, rel.kept_count, rel.valid_count)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_unsup_loss_does_not_grow_with_padding():
    """The same pixels with a padded border (ignored pseudo-labels, arbitrary logits) give the same loss: the
    percentile, the kept pixels and the valid / kept scale are all over valid pixels."""
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(2, 4, 6, 6, generator=gen)
    teacher = 2 * torch.randn(2, 4, 6, 6, generator=gen)
    pseudo = teacher.argmax(1)
    plain, _ = unsup_loss(student, pseudo, teacher, 20.0)
    padded_student = torch.cat([student, torch.randn(2, 4, 6, 10, generator=gen)], dim=3)  # 62.5 % padding
    padded_teacher = torch.cat([teacher, torch.randn(2, 4, 6, 10, generator=gen)], dim=3)
    padded_pseudo = torch.cat([pseudo, torch.full((2, 6, 10), 255)], dim=2)
    padded, _ = unsup_loss(padded_student, padded_pseudo, padded_teacher, 20.0)
    assert padded.item() == pytest.approx(plain.item(), rel=1e-6)
    assert padded.item() == pytest.approx(reference_unsup(padded_student, padded_pseudo, padded_teacher, 20.0)[0],
                                          rel=1e-5)


def test_unsup_loss_fp32_under_autocast_and_all_ignored_is_zero():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(1, 3, 4, 4, generator=gen).bfloat16().requires_grad_()
    teacher = torch.randn(1, 3, 4, 4, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = unsup_loss(student, teacher.argmax(1), teacher, 20.0)
    assert loss.dtype == torch.float32
    ignored = torch.full((1, 4, 4), 255)
    loss, ratio = unsup_loss(student.float(), ignored, teacher, 20.0)
    assert loss.item() == 0.0 and ratio.item() == 0.0


def reference_ohem(logits, target, thresh, min_kept, ignore=255):
    """Published OhemCrossEntropy2dTensor with plain Python lists."""
    batch, classes, height, width = logits.shape
    pixels = [(b, y, x) for b in range(batch) for y in range(height) for x in range(width)]
    probs = []
    for b, y, x in pixels:
        label = int(target[b, y, x])
        if label == ignore:
            probs.append(1.0)
            continue
        z = [float(v) for v in logits[b, :, y, x]]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        probs.append(e[label] / sum(e))
    valid = [int(target[b, y, x]) != ignore for b, y, x in pixels]
    keep = list(valid)
    if not min_kept > sum(valid):
        kth = sorted(probs)[min(len(probs), min_kept) - 1]
        threshold = kth if kth > thresh else thresh
        keep = [v and p <= threshold for v, p in zip(valid, probs)]
    kept = [px for px, k in zip(pixels, keep) if k]
    return sum(pixel_ce(logits, b, y, x, int(target[b, y, x])) for b, y, x in kept) / len(kept), len(kept)


@pytest.mark.parametrize(
    "thresh,min_kept",
    [(0.7, 1000), (0.7, 20), (0.2, 20), (0.05, 50), (0.9, 5)],
)
def test_ohem_matches_reference(thresh, min_kept):
    gen = torch.Generator().manual_seed(min_kept)
    logits = 1.5 * torch.randn(2, 3, 6, 7, generator=gen)
    target = torch.randint(0, 3, (2, 6, 7), generator=gen)
    target[1, :2] = 255
    expected, _ = reference_ohem(logits, target, thresh, min_kept)
    assert ohem_ce(logits, target, thresh=thresh, min_kept=min_kept).item() == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_only_hard_pixels_hand_case():
    # 4 pixels, 2 classes; true-class probabilities 0.9, 0.6, 0.2, ignored
    probs = torch.tensor([0.9, 0.6, 0.2, 0.5])
    logits = torch.stack([torch.log(probs), torch.log(1 - probs)]).reshape(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 0, 255]]])
    # min_kept=1: 1st smallest = 0.2 < 0.7, threshold 0.7 -> keep 0.6 and 0.2
    expected = (-math.log(0.6) - math.log(0.2)) / 2
    assert ohem_ce(logits, target, thresh=0.7, min_kept=1).item() == pytest.approx(expected, rel=1e-5)
    # min_kept=3 = num_valid: 3rd smallest = 0.9 > 0.7 -> threshold 0.9 keeps all three
    expected_all = (-math.log(0.9) - math.log(0.6) - math.log(0.2)) / 3
    assert ohem_ce(logits, target, thresh=0.7, min_kept=3).item() == pytest.approx(expected_all, rel=1e-5)
    # min_kept=4 > num_valid: keep all valid
    assert ohem_ce(logits, target, thresh=0.7, min_kept=4).item() == pytest.approx(expected_all, rel=1e-5)


def test_sup_loss_with_aux_hand_case():
    logits = torch.log(torch.tensor([0.25, 0.75])).reshape(1, 2, 1, 1).repeat(1, 1, 1, 2)
    aux = torch.log(torch.tensor([0.5, 0.5])).reshape(1, 2, 1, 1).repeat(1, 1, 1, 2)
    target = torch.tensor([[[1, 255]]])
    expected = -math.log(0.75) + 0.4 * math.log(2)
    assert sup_loss(logits, target, aux_logits=aux, aux_weight=0.4).item() == pytest.approx(expected, rel=1e-6)


def test_supervised_loss_of_an_all_ignore_batch_is_zero_and_counted():
    from u2pl_scale.config import load_config
    from u2pl_scale.engine.step import StepConfig, empty_labels, supervised_loss
    sc = StepConfig.from_config(load_config("configs/demo.yaml"))
    logits = torch.randn(2, 6, 4, 4, requires_grad=True)
    ignored = torch.full((2, 16, 16), 255)
    loss = supervised_loss(sc, logits, None, ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    assert empty_labels(sc, ignored).item() == 1.0
    labels = ignored.clone()
    labels[1, 3, 5] = 2  # one labeled pixel: the CE of that pixel alone (bilinear, align_corners upsampling)
    assert empty_labels(sc, labels).item() == 0.0
    up = torch.nn.functional.interpolate(logits.detach(), size=(16, 16), mode="bilinear", align_corners=True)
    assert supervised_loss(sc, logits, None, labels).item() == pytest.approx(pixel_ce(up, 1, 3, 5, 2), rel=1e-5)
