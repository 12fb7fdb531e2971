"""The optional hue-rotation strong augmentation (method.hue_jitter) against a per-pixel reference."""
import contextlib
import math

import numpy as np
import pytest
import torch

from u2pl_scale.config import ConfigError, load_config
from u2pl_scale.data.transforms import normalize
from u2pl_scale.engine.step import StepConfig, pseudo_labels
from u2pl_scale.method.color import hue_rotation_matrices, random_hue, rotate_hue

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def reference_rotate(pixel: np.ndarray, angle: float) -> np.ndarray:
    """One RGB pixel (0..255) rotated about the grey axis: keep its grey component, turn the rest in the plane
    perpendicular to the axis, clip."""
    axis = np.ones(3) / math.sqrt(3)
    grey = pixel.dot(axis) * axis
    rest = pixel - grey
    turned = grey + math.cos(angle) * rest + math.sin(angle) * np.cross(axis, rest)
    return np.clip(turned, 0, 255)


def test_rotations_by_hand():
    rotations = hue_rotation_matrices(torch.tensor([0.0, 2 * math.pi / 3, 0.7, 2 * math.pi]))
    assert torch.allclose(rotations[0], torch.eye(3), atol=1e-6)
    assert torch.allclose(rotations[3], torch.eye(3), atol=1e-6)
    # a third of a turn moves red to green, green to blue, blue to red: (r, g, b) -> (b, r, g)
    assert torch.allclose(rotations[1] @ torch.tensor([200.0, 50.0, 30.0]), torch.tensor([30.0, 200.0, 50.0]),
                          atol=1e-4)
    r = rotations[2]
    assert torch.allclose(r @ r.t(), torch.eye(3), atol=1e-6) and abs(torch.det(r).item() - 1) < 1e-5
    assert torch.allclose(r @ torch.ones(3), torch.ones(3), atol=1e-6)  # greys stay grey


def test_rotate_hue_matches_the_per_pixel_reference_on_normalised_images():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 5, 4), dtype=torch.uint8, generator=gen)
    angles = torch.tensor([0.4, -2.5, math.pi])
    x = normalize(pixels, MEAN, STD, channels_last=True)
    got = rotate_hue(x, angles, MEAN, STD)
    assert got.is_contiguous(memory_format=torch.channels_last)
    got_pixels = got * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    clipped = 0
    for i in range(3):
        for y in range(5):
            for x_ in range(4):
                want = reference_rotate(pixels[i, :, y, x_].double().numpy(), float(angles[i]))
                clipped += int(((want == 0) | (want == 255)).any())
                assert np.allclose(got_pixels[i, :, y, x_].double().numpy(), want, atol=2e-3)
    assert clipped > 0  # the clip was exercised


def test_random_hue_angles_stay_in_range():
    # a pure grey-free colour rotated by theta keeps its distance to the grey axis; the angle between the
    # before/after perpendicular parts is |theta| <= max_fraction * 360 degrees
    pixel = torch.tensor([150.0, 110.0, 90.0])  # rotations of it never clip
    x = ((pixel - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1).repeat(64, 1, 1, 1)
    out = random_hue(x, 0.1, MEAN, STD, generator=torch.Generator().manual_seed(1))
    out_pixels = out[:, :, 0, 0] * torch.tensor(STD) + torch.tensor(MEAN)
    axis = torch.ones(3) / math.sqrt(3)
    before = pixel - pixel.dot(axis) * axis
    after = out_pixels - (out_pixels @ axis)[:, None] * axis
    cos = (after @ before) / (after.norm(dim=1) * before.norm())
    angles = torch.arccos(cos.clamp(-1, 1))
    assert angles.max() <= 0.1 * 2 * math.pi + 1e-3
    assert angles.max() > 0.6 * 0.1 * 2 * math.pi  # 64 draws reach well into the range
    assert torch.allclose(out_pixels.sum(1), pixel.sum().expand(64), atol=1e-3)  # r + g + b kept


def test_pseudo_labels_come_from_the_unrotated_images():
    cfg = load_config(None, ["data.num_classes=3", "method.hue_jitter=0.5", "method.cutmix_prob=1.0"])
    sc = StepConfig.from_config(cfg)
    plain = StepConfig.from_config(load_config(None, ["data.num_classes=3", "method.cutmix_prob=1.0"]))

    class ColourTeacher(torch.nn.Module):  # class = argmax of the (normalised) R, G, B channels
        def forward(self, x):
            return {"pred": x}

    teacher = ColourTeacher()
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x_u = normalize(pixels, cfg.data.mean, cfg.data.std)
    valid = torch.ones(4, 16, 16, dtype=torch.bool)
    x_rot, labels_rot = pseudo_labels(sc, teacher, x_u, valid, contextlib.nullcontext,
                                      torch.Generator().manual_seed(5))
    x_mix, labels_mix = pseudo_labels(plain, teacher, x_u, valid, contextlib.nullcontext,
                                      torch.Generator().manual_seed(5))
    assert torch.equal(labels_rot, labels_mix)  # same CutMix boxes, labels of the unrotated images
    assert not torch.allclose(x_rot, x_mix)  # the student's input is rotated


def test_hue_jitter_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="method.hue_jitter"):
        load_config(None, ["method.hue_jitter=0.7"])
