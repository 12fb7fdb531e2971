"""Weak augmentation and device normalisation, checked against values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from u2pl_scale.data.transforms import fill_colour, normalize, weak_augment

MEAN = (123.675, 116.28, 103.53)
MEAN_UINT8 = np.array([124, 116, 104], dtype=np.uint8)  # rounded by hand


def _column_coded(height: int, width: int):
    """An image whose red channel is 10 x column and green 10 x row, and a mask holding the column index."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([cols * 10, rows * 10, np.full_like(cols, 7)], axis=-1).astype(np.uint8)
    return image, cols.astype(np.uint8)


def test_fill_colour_is_rounded_mean():
    assert fill_colour(MEAN).tolist() == MEAN_UINT8.tolist()


def test_shapes_and_dtypes_for_large_and_small_images():
    rng = np.random.default_rng(0)
    for height, width in [(75, 100), (5, 7)]:
        image, mask = _column_coded(height, width)
        out = weak_augment(image, mask, rng, crop_size=32, scale_range=(0.5, 2.0), flip_prob=0.5, mean=MEAN)
        assert out.image.shape == (32, 32, 3) and out.image.dtype == np.uint8
        assert out.mask.shape == (32, 32) and out.mask.dtype == np.uint8
        assert out.valid.shape == (32, 32) and out.valid.dtype == bool
        unlabeled = weak_augment(image, None, rng, crop_size=32, mean=MEAN)
        assert unlabeled.mask is None and unlabeled.image.shape == (32, 32, 3)


def test_padding_with_mean_colour_and_ignore_by_hand():
    image, mask = _column_coded(4, 6)
    out = weak_augment(image, mask, np.random.default_rng(1), crop_size=8, scale_range=(1.0, 1.0), flip_prob=0.0,
                       mean=MEAN, ignore_index=255)
    # A 4x6 image in an 8x8 crop: image at the top left, rows 4..7 and columns 6..7 are padding.
    assert np.array_equal(out.image[:4, :6], image)
    assert np.all(out.image[4:, :] == MEAN_UINT8) and np.all(out.image[:, 6:] == MEAN_UINT8)
    assert np.array_equal(out.mask[:4, :6], mask)
    assert np.all(out.mask[4:, :] == 255) and np.all(out.mask[:, 6:] == 255)
    expected_valid = np.zeros((8, 8), dtype=bool)
    expected_valid[:4, :6] = True
    assert np.array_equal(out.valid, expected_valid)


def test_flip_moves_image_mask_and_padding_together():
    image, mask = _column_coded(4, 6)
    out = weak_augment(image, mask, np.random.default_rng(2), crop_size=8, scale_range=(1.0, 1.0), flip_prob=1.0,
                       mean=MEAN)
    # After the flip the padding columns are on the left, the image columns mirrored.
    assert np.array_equal(out.image[:4, 2:], image[:, ::-1])
    assert np.array_equal(out.mask[:4, 2:], mask[:, ::-1])
    assert np.all(out.image[:, :2] == MEAN_UINT8) and np.all(out.mask[:, :2] == 255)
    assert not out.valid[:, :2].any() and out.valid[:4, 2:].all() and not out.valid[4:].any()


def test_flip_keeps_image_and_mask_aligned_after_rescale_and_crop():
    image, mask = _column_coded(20, 25)
    for seed in range(20):
        out = weak_augment(image, mask, np.random.default_rng(seed), crop_size=16, scale_range=(1.0, 1.0),
                           flip_prob=0.5, mean=MEAN)
        # red = 10 x column in the source, the mask is the column: they must agree pixel by pixel.
        assert np.array_equal(out.image[..., 0][out.valid], out.mask[out.valid].astype(np.uint8) * 10)


def test_random_crop_is_a_window_of_the_image():
    image, mask = _column_coded(20, 25)
    out = weak_augment(image, mask, np.random.default_rng(3), crop_size=16, scale_range=(1.0, 1.0), flip_prob=0.0,
                       mean=MEAN)
    assert out.valid.all()
    top, left = out.image[0, 0, 1] // 10, out.image[0, 0, 0] // 10  # green = 10 x row, red = 10 x column
    assert np.array_equal(out.image, image[top:top + 16, left:left + 16])
    assert np.array_equal(out.mask, mask[top:top + 16, left:left + 16])


def test_rescale_doubles_with_nearest_mask():
    image, mask = _column_coded(3, 4)
    out = weak_augment(image, mask, np.random.default_rng(4), crop_size=10, scale_range=(2.0, 2.0), flip_prob=0.0,
                       mean=MEAN)
    assert out.valid[:6, :8].all() and out.valid.sum() == 48  # 3x4 doubled to 6x8
    assert np.array_equal(out.mask[:6, :8], np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1))  # nearest


def test_scale_stays_in_range():
    image, mask = _column_coded(10, 10)
    for seed in range(30):
        out = weak_augment(image, mask, np.random.default_rng(seed), crop_size=40, scale_range=(0.5, 2.0),
                           flip_prob=0.0, mean=MEAN)
        height = int(out.valid[:, 0].sum())
        assert 5 <= height <= 20 and out.valid.sum() == height * height


def test_same_seed_same_result_other_seed_differs():
    image, mask = _column_coded(30, 40)
    first = weak_augment(image, mask, np.random.default_rng(7), crop_size=24, mean=MEAN)
    again = weak_augment(image, mask, np.random.default_rng(7), crop_size=24, mean=MEAN)
    other = weak_augment(image, mask, np.random.default_rng(8), crop_size=24, mean=MEAN)
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_by_hand(channels_last):
    images = torch.tensor([[[[0, 255]], [[100, 200]], [[50, 50]]]], dtype=torch.uint8)  # [1, 3, 1, 2]
    out = normalize(images, mean=(10.0, 100.0, 50.0), std=(5.0, 50.0, 2.0), channels_last=channels_last)
    expected = torch.tensor([[[[-2.0, 49.0]], [[0.0, 2.0]], [[0.0, 0.0]]]])
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_published_scale_rule_shrinks_and_enlarges_equally_often():
    """The published RandResize: half the draws in [0.5, 1), half in [1, 2), each uniform; a uniform draw over
    [0.5, 2) would shrink only a third of the time."""
    from u2pl_scale.data.transforms import random_scale
    rng = np.random.default_rng(0)
    draws = np.array([random_scale(rng, (0.5, 2.0), "published") for _ in range(20000)])
    assert draws.min() >= 0.5 and draws.max() < 2.0
    small, large = draws[draws < 1.0], draws[draws >= 1.0]
    assert abs(len(small) / len(draws) - 0.5) < 0.015
    assert abs(small.mean() - 0.75) < 0.01 and abs(large.mean() - 1.5) < 0.02  # uniform within each half
    uniform = np.array([random_scale(rng, (0.5, 2.0), "uniform") for _ in range(20000)])
    assert abs((uniform < 1.0).mean() - 1 / 3) < 0.015
    # a range on one side of 1 is drawn uniformly under either rule
    above = np.array([random_scale(rng, (1.25, 1.75), "published") for _ in range(5000)])
    assert above.min() >= 1.25 and abs(above.mean() - 1.5) < 0.01
