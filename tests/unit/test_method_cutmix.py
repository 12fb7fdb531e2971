"""CutMix boxes and mixing against per-pixel loops (U2PL_SPEC.md section 3 step 3)."""

import torch

from u2pl_scale.method.cutmix import box_masks, cutmix, cutmix_flag, sample_boxes


def test_boxes_have_published_size_and_fit():
    gen = torch.Generator().manual_seed(0)
    for height, width in [(513, 513), (64, 48), (9, 10)]:
        boxes = sample_boxes(200, height, width, generator=gen)
        y0, x0, h, w = boxes.unbind(1)
        assert ((w > width / 2) & (w < width)).all()
        area = height * width / 2
        assert torch.equal(h, torch.round(area / w.double()).long())
        assert (y0 >= 0).all() and (x0 >= 0).all()
        assert (y0 + h <= height).all() and (x0 + w <= width).all()
    # positions are spread over the allowed range, not stuck at 0
    boxes = sample_boxes(200, 64, 64, generator=gen)
    assert boxes[:, 0].unique().numel() > 5 and boxes[:, 1].unique().numel() > 3


def test_box_masks_hand_case():
    boxes = torch.tensor([[1, 2, 2, 3]])  # y0=1, x0=2, h=2, w=3
    expected = torch.zeros(1, 4, 6, dtype=torch.bool)
    for y in range(1, 3):
        for x in range(2, 5):
            expected[0, y, x] = True
    assert torch.equal(box_masks(boxes, 4, 6), expected)


def test_cutmix_takes_next_image_inside_the_same_box_for_every_tensor():
    gen = torch.Generator().manual_seed(1)
    batch, height, width = 3, 6, 8
    images = torch.randn(batch, 3, height, width, generator=gen)
    labels = torch.randint(0, 5, (batch, height, width), generator=gen)
    conf = torch.rand(batch, height, width, generator=gen)
    ignore = torch.rand(batch, height, width, generator=gen) > 0.5
    boxes = sample_boxes(batch, height, width, generator=gen)
    out_images, out_labels, out_conf, out_ignore = cutmix(images, labels, conf, ignore, boxes=boxes)
    for i in range(batch):
        y0, x0, h, w = boxes[i].tolist()
        source = (i + 1) % batch
        for y in range(height):
            for x in range(width):
                inside = y0 <= y < y0 + h and x0 <= x < x0 + w
                k = source if inside else i
                assert torch.equal(out_images[i, :, y, x], images[k, :, y, x])
                assert out_labels[i, y, x] == labels[k, y, x]
                assert out_conf[i, y, x] == conf[k, y, x]
                assert out_ignore[i, y, x] == ignore[k, y, x]


def test_cutmix_not_applied_changes_nothing():
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 5, 5, generator=gen)
    labels = torch.randint(0, 3, (2, 5, 5), generator=gen)
    conf = torch.rand(2, 5, 5, generator=gen)
    for apply in (False, torch.tensor(False)):
        out = cutmix(images, labels, conf, apply=apply, generator=gen)
        assert all(torch.equal(a, b) for a, b in zip(out, (images, labels, conf)))
    mixed = cutmix(images, labels, conf, apply=torch.tensor(True), generator=gen)
    assert not torch.equal(mixed[0], images)


def test_cutmix_flag_is_a_device_bool_with_probability_half():
    gen = torch.Generator().manual_seed(3)
    flags = torch.stack([cutmix_flag(0.5, generator=gen) for _ in range(2000)])
    assert flags.dtype == torch.bool and flags.shape == (2000,)
    assert 0.45 < flags.float().mean().item() < 0.55
