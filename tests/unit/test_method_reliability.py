"""Entropy, percentiles and reliability masks against hand values and numpy (U2PL_SPEC.md sections 4, 6)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from u2pl_scale.method.reliability import (
    alpha_t,
    downsample_nearest,
    drop_percent,
    entropy,
    percentile,
    percentiles,
    reliability,
)


def percentile_on(stages, values, mask, q):
    """The q-th percentile as `stages` compute it (their percentiles_and_count stage)."""
    return stages.percentiles_and_count(values, mask, [q])[0][0]


def test_entropy_hand_values():
    prob = torch.tensor([[0.5, 1.0, 0.25], [0.5, 0.0, 0.75]]).reshape(1, 2, 1, 3)
    expected = [math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert torch.allclose(entropy(prob)[0, 0], torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("q", [0.0, 3.0, 17.5, 50.0, 80.0, 99.9, 100.0])
def test_percentile_matches_numpy_with_mask(q, method_path):
    gen = torch.Generator().manual_seed(int(q * 10))
    values = torch.randn(3, 17, 19, generator=gen)
    mask = torch.rand(3, 17, 19, generator=gen) > 0.3
    expected = np.percentile(values[mask].numpy().astype(np.float64), q)
    assert percentile_on(method_path, values, mask, q).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert percentile(values, mask, q).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_percentiles_many_with_ties_negatives_and_tensor_q(method_path):
    values = torch.tensor([3.0, -1.0, 3.0, 3.0, -2.5, 0.0, 7.0, 1e-12, -1e-10, 2.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    qs = [0.0, 10.0, 33.3, 50.0, 90.0, 100.0]
    expected = np.percentile(values[mask].numpy().astype(np.float64), qs)
    for got in (percentiles(values, mask, torch.tensor(qs)), method_path.percentiles_and_count(values, mask, qs)[0],
                method_path.percentiles_and_count(values, mask, torch.tensor(qs))[0]):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert method_path.percentiles_and_count(values, mask, qs)[1].item() == 8


def test_percentile_hand_interpolation(method_path):
    values = torch.tensor([10.0, 0.0, 20.0, 30.0, 99.0])
    mask = torch.tensor([True, True, True, True, False])
    # sorted valid 0, 10, 20, 30; q=50 -> position 1.5 -> 15; q=80 -> 2.4 -> 24
    assert percentile_on(method_path, values, mask, 50.0).item() == pytest.approx(15.0)
    assert percentile_on(method_path, values, mask, 80.0).item() == pytest.approx(24.0)


def test_percentile_no_valid_is_inf_and_single_valid(method_path):
    values = torch.tensor([1.0, 2.0])
    assert percentile_on(method_path, values, torch.zeros(2, dtype=torch.bool), 50.0).item() == math.inf
    assert percentile_on(method_path, values, torch.tensor([False, True]), 37.0).item() == 2.0


def test_schedules_hand_values():
    assert drop_percent(0.0) == 20.0 and drop_percent(0.5) == 10.0 and drop_percent(0.75, start=40.0) == 10.0
    assert alpha_t(0.25) == 15.0
    assert torch.allclose(alpha_t(torch.tensor(0.9)), torch.tensor(2.0))


def test_reliability_on_hand_worked_entropies(method_path):
    # 1 image, 2 classes, 1x5 pixels; logits chosen so entropies are strictly increasing left to right
    margins = torch.tensor([8.0, 3.0, 1.5, 0.5, 0.0])
    logits = torch.stack([margins, torch.zeros(5)]).reshape(1, 2, 1, 5)
    pseudo = torch.tensor([[[0, 0, 255, 0, 0]]])
    # valid pixels 0, 1, 3, 4 with entropies H0 < H1 < H3 < H4
    rel = reliability(logits, pseudo, drop_percent=50.0, alpha_t=25.0, stages=method_path)
    h = entropy(torch.softmax(logits, 1))[0, 0]
    valid_h = torch.stack([h[0], h[1], h[3], h[4]])
    # drop threshold: percentile 50 -> midway between H1 and H3; pixels 3 and 4 dropped
    assert rel.drop_threshold.item() == pytest.approx(((valid_h[1] + valid_h[2]) / 2).item(), rel=1e-6)
    assert rel.reliable_labels.tolist() == [[[0, 0, 255, 255, 255]]]
    assert rel.kept_count.item() == 2 and rel.valid_count.item() == 4
    assert rel.reliable_ratio.item() == pytest.approx(0.5)
    # alpha 25: low <= percentile 25 (position 0.75 between H0 and H1) -> only pixel 0
    # high >= percentile 75 (position 2.25 between H3 and H4) -> only pixel 4
    assert rel.low_mask.tolist() == [[[True, False, False, False, False]]]
    assert rel.high_mask.tolist() == [[[False, False, False, False, True]]]
    assert pseudo.tolist() == [[[0, 0, 255, 0, 0]]]  # input untouched


def test_downsample_nearest_equals_onehot_interpolation():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 13, 13), generator=gen)
    labels[0, :3] = 255
    small = downsample_nearest(labels, (4, 4))
    valid = labels != 255
    onehot = F.one_hot(torch.where(valid, labels, 0), 4).permute(0, 3, 1, 2).float() * valid[:, None]
    onehot_small = F.interpolate(onehot, size=(4, 4), mode="nearest")
    for n in range(2):
        for y in range(4):
            for x in range(4):
                column = onehot_small[n, :, y, x]
                expected = 255 if column.sum() == 0 else int(column.argmax())
                assert int(small[n, y, x]) == expected
    mask_small = downsample_nearest(valid, (4, 4))
    assert mask_small.dtype == torch.bool
    assert torch.equal(mask_small, small != 255)
