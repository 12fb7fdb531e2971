"""The fused CPU kernels (u2pl_scale/method/native.py, cpu_kernels.c) against slow float64 references, their bad-input
errors, and how they are built, cached, and replaced by torch ops where they cannot be built."""

import warnings

import pytest
import torch

from conftest import NATIVE_KERNELS, count_kernel_calls, require_native_kernels
from u2pl_scale.method import native
from u2pl_scale.method.reliability import entropy_from_logits


@pytest.fixture
def kernels():
    require_native_kernels()
    return native


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count (which the kernels split their rows over) for one call, then restores."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def _logits(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(shape, generator=gen)
    logits[0, :, 0, 0] = 0.0  # a pixel whose classes all tie
    logits[-1, 0, -1, :] += 60.0  # confident pixels: entropies near 0
    return logits


@pytest.mark.parametrize("shape", [(2, 5, 3, 13), (1, 21, 4, 37), (3, 1, 2, 9), (1, 3, 1, 1)])
def test_entropy_matches_float64(kernels, threads, shape):
    logits = _logits(shape, 0)
    prob = torch.softmax(logits.double(), 1)
    expected = -(prob * torch.log(prob.clamp(min=1e-300))).sum(1)
    threads(1)
    one = kernels.entropy(logits)
    threads(3)  # rows split over three workers (more than some shapes have rows): the same values
    assert torch.equal(kernels.entropy(logits), one)
    assert torch.allclose(one.double(), expected, rtol=1e-5, atol=2e-6)


def _ce_reference(logits, target, ignore_index, scale):
    valid = target != ignore_index
    log_prob = torch.log_softmax(logits.double(), 1)
    safe = torch.where(valid, target, 0)
    picked = log_prob.gather(1, safe[:, None])[:, 0]
    loss = -(picked * valid).sum()
    onehot = torch.zeros_like(log_prob).scatter_(1, safe[:, None], 1.0)
    grad = scale * (log_prob.exp() - onehot) * valid[:, None]
    return loss, grad


@pytest.mark.parametrize("shape", [(2, 5, 3, 13), (1, 21, 6, 37), (2, 1, 2, 9)])
def test_ce_value_and_gradient_match_float64(kernels, threads, shape):
    logits = _logits(shape, 1)
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
    target[0, 0, :5] = 255
    loss_ref, grad_ref = _ce_reference(logits, target, 255, 0.37)
    grad = torch.full_like(logits, float("nan"))  # every element must be written
    threads(2)
    loss = kernels.ce_grad(logits, target, 255, 0.37, grad)
    assert loss == pytest.approx(loss_ref.item(), rel=1e-6, abs=1e-4)
    assert torch.allclose(grad.double(), grad_ref, atol=1e-7)
    assert torch.equal(grad[0, :, 0, :5], torch.zeros_like(grad[0, :, 0, :5]))  # ignored pixels: no gradient


def test_ce_with_every_pixel_ignored_is_zero(kernels):
    logits = _logits((1, 4, 2, 3), 3)
    grad = torch.full_like(logits, float("nan"))
    assert kernels.ce_grad(logits, torch.full((1, 2, 3), 7), 7, 1.0, grad) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("label", [4, -1, 300])
def test_ce_rejects_a_label_out_of_range(kernels, label):
    logits = _logits((1, 4, 2, 3), 3)
    target = torch.zeros(1, 2, 3, dtype=torch.long)
    target[0, 1, 2] = label
    with pytest.raises(IndexError, match=r"neither in \[0, 4\) nor the ignore index 255"):
        kernels.ce_grad(logits, target, 255, 1.0, torch.empty_like(logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("negatives,dim", [(7, 13), (1, 8), (50, 256)])
def test_anchor_negatives_match_float64(kernels, threads, dtype, negatives, dim):
    gen = torch.Generator().manual_seed(4)
    rows, queue = 11, 40
    buffer = torch.nn.functional.normalize(torch.randn(queue, dim, generator=gen), dim=1).to(dtype)
    scaled = 2 * torch.randn(rows, dim, generator=gen)
    index = torch.randint(0, queue, (rows, negatives), generator=gen)
    positive = torch.randn(rows, generator=gen)
    keys = buffer.double()[index]  # [rows, K, D]
    logits = torch.cat([positive.double()[:, None], torch.einsum("md,mkd->mk", scaled.double(), keys)], 1)
    log_prob = torch.log_softmax(logits, 1)
    grad_ref = torch.einsum("mk,mkd->md", log_prob[:, 1:].exp(), keys)
    threads(2)
    log_p0, p0_minus_1, grad = kernels.anchor_negatives(scaled, buffer, index, positive)
    assert torch.allclose(log_p0.double(), log_prob[:, 0], atol=2e-6)
    assert torch.allclose(p0_minus_1.double(), log_prob[:, 0].exp() - 1, atol=1e-6)
    assert torch.allclose(grad.double(), grad_ref, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 40])
def test_anchor_negatives_reject_an_index_out_of_range(kernels, bad):
    index = torch.zeros(3, 5, dtype=torch.long)
    index[2, 4] = bad
    with pytest.raises(IndexError, match=r"not in \[0, 40\)"):
        kernels.anchor_negatives(torch.randn(3, 8), torch.randn(40, 8), index, torch.randn(3))


def test_inputs_the_kernels_do_not_take_are_left_to_torch_ops(kernels):
    logits = torch.randn(2, 3, 4, 5)
    assert kernels.entropy(logits.to(torch.bfloat16)) is None
    assert kernels.entropy(logits.clone().requires_grad_()) is None  # a result without a graph would be wrong
    with torch.no_grad():
        assert kernels.entropy(logits.clone().requires_grad_()) is not None
    assert kernels.entropy(logits.contiguous(memory_format=torch.channels_last)) is None
    target = torch.zeros(2, 4, 5, dtype=torch.long)
    assert kernels.ce_grad(logits, target.int(), 255, 1.0, torch.empty_like(logits)) is None
    assert kernels.anchor_negatives(torch.randn(3, 8), torch.randn(40, 8, dtype=torch.float16),
                                    torch.zeros(3, 5, dtype=torch.long), torch.randn(3)) is None


def _fresh(monkeypatch, tmp_path, cc=None):
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setenv("U2PL_NATIVE_CACHE", str(tmp_path / "cache"))
    if cc is not None:
        monkeypatch.setenv("CC", cc)


def test_build_is_cached_and_leaves_no_partial_file(monkeypatch, tmp_path):
    require_native_kernels()
    _fresh(monkeypatch, tmp_path)
    assert native.library() is not None
    built = sorted((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    assert built[0].stat().st_mode & 0o044 == 0o044  # readable by others sharing the cache directory
    stamp = built[0].stat().st_mtime_ns
    _fresh(monkeypatch, tmp_path)  # a new process, in effect: loads the cached file, builds nothing
    assert native.library() is not None
    assert sorted((tmp_path / "cache").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("cc,reason", [("/nonexistent/cc", "no C compiler found"), ("false", "false failed on")])
def test_without_a_working_compiler_the_method_warns_once_and_runs_torch_ops(monkeypatch, tmp_path, cc, reason):
    _fresh(monkeypatch, tmp_path, cc)
    logits = _logits((2, 5, 3, 13), 5)
    with pytest.warns(RuntimeWarning, match=reason):
        got = entropy_from_logits(logits)
    prob = torch.softmax(logits.double(), 1)
    assert torch.allclose(got.double(), -(prob * torch.log(prob.clamp(min=1e-300))).sum(1), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        entropy_from_logits(logits)
    assert not list((tmp_path / "cache").glob("*.partial"))  # a failed build leaves nothing behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepare_rows_matches_normalize_and_class_sums(kernels, threads, dtype):
    gen = torch.Generator().manual_seed(6)
    rows = 3 * torch.randn(300, 40, generator=gen)
    rows[7] = 0  # F.normalize keeps a zero row zero
    label = torch.randint(0, 6, (300,), generator=gen)  # 5 = none; class 2 left empty below
    label[label == 2] = 5
    threads(3)
    unit, sums, counts = kernels.prepare_rows(rows, label, 5, dtype)
    expected = torch.nn.functional.normalize(rows.double(), dim=1)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # bf16: within one rounding of the fp32 value
    assert unit.dtype == dtype and torch.allclose(unit.double(), expected, rtol=tol, atol=1e-7)
    assert torch.equal(unit[7], torch.zeros_like(unit[7]))
    onehot = (label[:, None] == torch.arange(5)[None, :]).double()
    assert torch.allclose(sums.double(), onehot.t() @ rows.double(), atol=1e-4)
    assert torch.equal(counts, onehot.sum(0).long()) and counts[2] == 0


def test_prepare_rows_rejects_a_label_out_of_range(kernels):
    with pytest.raises(IndexError, match=r"not in \[0, 5\]"):
        kernels.prepare_rows(torch.randn(4, 8), torch.tensor([0, 6, 1, 5]), 5, torch.float32)


@pytest.mark.parametrize("dtype,dim", [(torch.float32, 256), (torch.bfloat16, 16), (torch.float32, 3)])
@pytest.mark.parametrize("mask_layout", ["class-major", "row-major"])
def test_push_writes_the_same_queue_as_the_torch_ops(kernels, threads, monkeypatch, dtype, dim, mask_layout):
    """Pushes of random rows into rings that wrap, one class given more rows than it holds, the mask both as a
    class-major tensor (as contrastive_prepare hands it) and as a transposed [N, C] one (push_packed): the buffer
    and ring state equal those of the torch-op push, bit for bit (dim 256 fp32 and 16 bf16 rows take the streaming
    stores, dim 3 the plain copy)."""
    from u2pl_scale.method.queues import ClassQueues

    gen = torch.Generator().manual_seed(7)
    capacities = [50, 7, 30, 1]
    queues = {path: ClassQueues(4, dim, capacities, dtype=dtype) for path in ("native", "torch-ops")}
    threads(2)
    for step in range(4):
        features = torch.randn(40, dim, generator=gen)
        mask = torch.rand(40, 4, generator=gen) < 0.4
        mask[:, 1] = step % 2 == 1  # 40 rows for a ring of 7: only the newest 7 are kept
        if mask_layout == "class-major":
            mask = mask.t().contiguous().t()
        for path, queue in queues.items():
            monkeypatch.setattr(native, "ENABLED", path == "native")
            queue.push(features, mask)
    native_queue, torch_queue = queues["native"], queues["torch-ops"]
    assert torch.equal(native_queue.buffer, torch_queue.buffer)
    assert torch.equal(native_queue.write_ptr, torch_queue.write_ptr)
    assert torch.equal(native_queue.fill, torch_queue.fill)
    assert native_queue.fill.tolist() == [50, 7, 30, 1] and native_queue.buffer.abs().sum() > 0


@pytest.mark.parametrize("num_labeled,low_rank,high_rank", [(2, 3, 20), (0, 3, 20), (5, 1, 4), (1, 7, 30), (3, 0, 7)])
def test_negative_mask_equals_a_stable_sort_of_each_pixels_classes(kernels, threads, num_labeled, low_rank,
                                                                  high_rank):
    """Against ranks from torch.sort(stable=True, descending=True) of each pixel's classes, on probabilities
    quantised so that most pixels hold ties, with ignored labels and a threshold that removes some classes."""
    gen = torch.Generator().manual_seed(8)
    batch, classes, pixels = 5, 7, 300  # 300 pixels: a full block of 256 and a ragged one
    prob = torch.cat([torch.randint(0, 4, (batch, classes, 150), generator=gen).float() / 4,
                      torch.softmax(torch.randn(batch, classes, 150, generator=gen), 1)], dim=2)
    labels = torch.randint(0, classes + 1, (batch, pixels), generator=gen)
    labels[labels == classes] = 255
    high = torch.rand(batch, pixels, generator=gen) < 0.7
    threads(3)
    got = kernels.negative_mask(prob, labels, high, num_labeled, low_rank, high_rank, 0.6)

    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(classes)[None, :, None].expand_as(order))
    labeled = (torch.arange(batch) < num_labeled)[:, None, None]
    not_label = labels[:, None, :] != torch.arange(classes)[None, :, None]
    window = torch.where(labeled, (rank < low_rank) & not_label, (rank >= low_rank) & (rank < high_rank))
    expected = (high[:, None, :] & (prob < 0.6) & window).transpose(0, 1)
    assert got.shape == (classes, batch, pixels) and torch.equal(got, expected)
    assert expected.any() and not expected.all()


def test_negative_mask_leaves_many_classes_to_torch_ops(kernels):
    classes = native.NEGATIVE_MASK_MAX_CLASSES + 1
    assert kernels.negative_mask(torch.rand(1, classes, 4), torch.zeros(1, 4, dtype=torch.long),
                                 torch.ones(1, 4, dtype=torch.bool), 1, 3, 20, 1.0) is None


def test_a_method_step_on_cpu_runs_every_kernel(kernels, monkeypatch):
    """A whole eager method step on CPU (benchmarks/method_overhead.py's step at small shapes, VOC's 21 classes)
    calls each kernel and each one handles its input, so no part silently falls back to torch ops."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import method_overhead as mo

    handled = count_kernel_calls(monkeypatch)
    inputs = mo.make_inputs((2, 2, 33, 9, 21, [64] * 21), torch.device("cpu"), torch.float32, dim=16,
                            contrastive=dict(num_anchors=8, num_negatives=5))
    mo.method_step(inputs, 0.1, torch.Generator().manual_seed(0))
    assert handled == dict.fromkeys(NATIVE_KERNELS, 1), handled
