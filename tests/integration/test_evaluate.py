"""Evaluation: confusion matrix and mIoU by hand, sliding window vs whole image, reduction over 2 gloo ranks."""
import contextlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from u2pl_scale.engine.evaluate import confusion_matrix, evaluate, iou_from_confusion, predict


def test_confusion_and_miou_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = confusion_matrix(pred, label, num_classes=3)
    # rows = truth: class 0 -> (0, 1); class 1 -> (1, 1, 2); class 2 -> (2, 0); the 255 pixel is ignored
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    miou, per_class = iou_from_confusion(cm)
    # IoU = TP / (TP + FP + FN): class 0: 1/(1+1+1), class 1: 2/(2+1+1), class 2: 1/(1+1+1)
    assert per_class == pytest.approx([1 / 3, 2 / 4, 1 / 3])
    assert miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)


def test_absent_class_is_left_out_of_the_mean():
    cm = torch.tensor([[3, 0, 0], [0, 1, 0], [0, 0, 0]])
    miou, per_class = iou_from_confusion(cm)
    assert per_class[2] is None and miou == pytest.approx(1.0)


class PointwiseModel(torch.nn.Module):
    """Logits depend on each pixel only (no context), so any tiling of windows gives the whole-image result."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.mix = torch.nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return {"pred": self.mix(x)}


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    model = PointwiseModel()
    image = torch.randn(1, 3, 37, 53)
    whole = predict(model, image, 3, "whole", crop=16, stride_rate=2 / 3)
    sliding = predict(model, image, 3, "sliding", crop=16, stride_rate=2 / 3)
    assert sliding.shape == whole.shape == (1, 3, 37, 53)
    assert torch.allclose(sliding, whole, atol=1e-5)
    # an image smaller than the crop is padded, and the padding cut off again
    small = torch.randn(1, 3, 10, 12)
    assert torch.allclose(predict(model, small, 3, "sliding", 16, 2 / 3), predict(model, small, 3, "whole", 16, 2 / 3),
                          atol=1e-5)


def _val_batches(rank, world):
    g = torch.Generator().manual_seed(7)
    batches = []
    for i in range(9):  # an odd count: ranks get 5 and 4 images
        h, w = (20, 24) if i % 3 else (16, 16)
        image = torch.randint(0, 255, (1, 3, h, w), generator=g, dtype=torch.uint8)
        label = torch.randint(0, 3, (1, h, w), generator=g)
        label[:, :2] = 255
        if i % world == rank:
            batches.append({"image": image, "label": label, "key": [str(i)]})
    return batches


def _run_eval(rank, world, batch_size):
    torch.manual_seed(0)
    model = PointwiseModel()
    prepare = lambda b: (b["image"].float() / 50 - 2.5, b["label"])  # noqa: E731
    return evaluate(model, _val_batches(rank, world), prepare, 3, 255, "whole", 16, 2 / 3, contextlib.nullcontext,
                    batch_size=batch_size)


def _rank_main(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    result = _run_eval(rank, world, batch_size=2)
    queue.put((rank, result["miou"], result["confusion"].tolist()))
    torch.distributed.destroy_process_group()


def test_miou_reduced_over_two_ranks_equals_single_rank():
    single = _run_eval(0, 1, batch_size=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, miou, confusion in results:
        assert confusion == single["confusion"].tolist()
        assert miou == pytest.approx(single["miou"])
