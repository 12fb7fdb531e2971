"""ClassQueues against a slow reference (one Python deque per class), locally and on 2 gloo ranks
(U2PL_SPEC.md section 6: FIFO queues, push before sampling, identical queues on every rank). The pushes run with
each write stage that runs here (fixture method_path): the CPU's host-side copy and the reference's compacted
write."""

import os
from collections import deque

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from net import free_port
from u2pl_scale import accel
from u2pl_scale.method.queues import ClassQueues


def reference_push(deques, features, class_mask):
    """Published dequeue_and_enqueue: per class, append pixel features in pixel order, keep the newest."""
    for i in range(features.shape[0]):
        for c in range(class_mask.shape[1]):
            if class_mask[i, c]:
                deques[c].append(tuple(features[i].tolist()))


def assert_same_multisets(queues, deques):
    for c, ref in enumerate(deques):
        got = sorted(tuple(row) for row in queues.class_features(c).tolist())
        assert got == sorted(ref), f"class {c}"
        assert int(queues.fill[c]) == len(ref)


def unique_features(num, dim, start):
    """Rows that identify themselves: row k is (start + k, start + k + 0.5, ...)."""
    ids = torch.arange(start, start + num, dtype=torch.float32)[:, None]
    return ids + 0.5 * torch.arange(dim, dtype=torch.float32)[None, :]


def test_random_pushes_match_deque_reference_with_wraparound(method_path):
    gen = torch.Generator().manual_seed(0)
    capacities = [5, 3, 8, 1]
    queues = ClassQueues(4, 3, capacities, write=method_path.queue_write)
    deques = [deque(maxlen=c) for c in capacities]
    start = 0
    for step in range(12):
        num = int(torch.randint(0, 9, (), generator=gen))
        features = unique_features(num, 3, start)
        start += num
        class_mask = torch.rand(num, 4, generator=gen) < 0.45  # several classes per pixel
        queues.push(features, class_mask)
        reference_push(deques, features, class_mask)
        assert_same_multisets(queues, deques)
    assert int(queues.dropped_pairs) == 0


def test_static_push_with_a_small_max_pairs_drops_the_last_pairs_and_counts_them(method_path):
    """6 rows into every class of capacities [5, 3, 8, 1]: kept pairs 5 + 3 + 6 + 1 = 15 in class-major order.
    With max_pairs=10 the first 10 are written (class 0's 5, class 1's 3, class 2's first 2) and 5 are counted as
    dropped; pointers and fill advance as if all were written. max_pairs=15 writes all, as the CPU's host-side push
does (every write stage compacts when given max_pairs)."""
    features = unique_features(6, 2, 0)
    mask = torch.ones(6, 4, dtype=torch.bool)
    small = ClassQueues(4, 2, [5, 3, 8, 1], write=method_path.queue_write)
    small.push(features, mask, max_pairs=10)
    assert int(small.dropped_pairs) == 5
    assert small.buffer[0:5, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # the newest 5 of 6, from slot 0
    assert small.buffer[5:8, 0].tolist() == [3.0, 4.0, 5.0]
    assert small.buffer[8:10, 0].tolist() == [0.0, 1.0]
    assert small.buffer[10:17, 0].tolist() == [0.0] * 7  # class 2's other slots and class 3's were not written
    assert small.write_ptr.tolist() == [0, 0, 6, 0] and small.fill.tolist() == [5, 3, 6, 1]
    exact = ClassQueues(4, 2, [5, 3, 8, 1], write=accel.select("cpu").queue_write)
    enough = ClassQueues(4, 2, [5, 3, 8, 1], write=method_path.queue_write)
    exact.push(features, mask)
    enough.push(features, mask, max_pairs=15)
    assert int(enough.dropped_pairs) == 0
    for key, value in exact.state_dict().items():
        assert torch.equal(value, enough.state_dict()[key]), key


def test_more_than_capacity_in_one_push_keeps_newest_and_moves_pointer(method_path):
    queues = ClassQueues(2, 2, [3, 4], write=method_path.queue_write)
    features = unique_features(7, 2, 0)
    mask = torch.zeros(7, 2, dtype=torch.bool)
    mask[:, 0] = True  # 7 keys into a queue of 3
    mask[[1, 4], 1] = True
    queues.push(features, mask)
    assert sorted(queues.class_features(0)[:, 0].tolist()) == [4.0, 5.0, 6.0]
    assert sorted(queues.class_features(1)[:, 0].tolist()) == [1.0, 4.0]
    assert queues.write_ptr.tolist() == [0, 2] and queues.fill.tolist() == [3, 2]
    # the next push overwrites the oldest first
    queues.push(unique_features(1, 2, 100), torch.tensor([[True, False]]))
    assert sorted(queues.class_features(0)[:, 0].tolist()) == [5.0, 6.0, 100.0]


def test_hand_ring_positions(method_path):
    queues = ClassQueues(1, 1, [4], write=method_path.queue_write)
    queues.push(torch.tensor([[1.0], [2.0], [3.0]]), torch.ones(3, 1, dtype=torch.bool))
    queues.push(torch.tensor([[4.0], [5.0]]), torch.ones(2, 1, dtype=torch.bool))
    # ring [5, 2, 3, 4]; pointer at 1; scratch row untouched
    assert queues.buffer[:4, 0].tolist() == [5.0, 2.0, 3.0, 4.0]
    assert queues.write_ptr.tolist() == [1] and queues.buffer[4, 0].item() == 0.0


def test_sample_is_uniform_over_filled_part_and_flags_empty_queues():
    queues = ClassQueues(3, 1, [10, 6, 4])
    queues.push(torch.arange(4.0)[:, None], torch.tensor([[1, 0, 0]] * 4, dtype=torch.bool))
    queues.push(torch.arange(10.0, 16.0)[:, None], torch.tensor([[0, 1, 0]] * 6, dtype=torch.bool))
    gen = torch.Generator().manual_seed(0)
    features, valid = queues.sample(4000, generator=gen)
    assert valid.tolist() == [True, True, False]
    counts0 = torch.bincount(features[0, :, 0].long(), minlength=4)
    assert counts0.numel() == 4 and (counts0 > 850).all()  # only the 4 filled slots, about 1000 each
    assert set(features[1, :, 0].long().tolist()) == set(range(10, 16))
    index, valid_one = queues.sample_indices(5, classes=torch.tensor([2]), generator=gen)
    assert index.tolist() == [[16] * 5] and valid_one.tolist() == [False]


def test_state_dict_round_trip_and_mismatch_error():
    queues = ClassQueues(2, 2, [3, 2])
    queues.push(unique_features(4, 2, 0), torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool))
    restored = ClassQueues(2, 2, [3, 2])
    restored.load_state_dict({k: v.clone() for k, v in queues.state_dict().items()})
    for key, value in queues.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    with pytest.raises(ValueError, match="capacities"):
        ClassQueues(2, 2, [3, 3]).load_state_dict(queues.state_dict())


# ---------------------------------------------------------------- two gloo ranks
# every rank's budget ceil(capacity / 2) is at least ROWS: each rank sends all its negatives, and the push is the
# published one (tests/integration/test_queue_exchange.py: ranks with more negatives than their budget)
CAPACITIES = [16, 17, 18]
ROWS = 8
DIM = 3
STEPS = 5


def rank_inputs(rank, step):
    """Rank 0 sends nothing at step 0; rank 1 sends all its rows to every class at step 1; random otherwise. Over
    the steps the pushes wrap around every ring."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    features = unique_features(ROWS, DIM, 1000 * step + 100 * rank)
    mask = torch.rand(ROWS, len(CAPACITIES), generator=gen) < 0.5
    if rank == 0 and step == 0:
        mask[:] = False
    if rank == 1 and step == 1:
        mask[:] = True
    return features, mask


def _worker(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        queues = ClassQueues(len(CAPACITIES), DIM, CAPACITIES, write=accel.select("cpu").queue_write)  # the trainer's
        for step in range(STEPS):
            features, mask = rank_inputs(rank, step)
            queues.push_distributed(features, mask)
        torch.save(queues.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_hold_identical_queues_equal_to_rank_ordered_reference(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    deques = [deque(maxlen=c) for c in CAPACITIES]
    for step in range(STEPS):
        for rank in range(2):
            reference_push(deques, *rank_inputs(rank, step))
    queues = ClassQueues(len(CAPACITIES), DIM, CAPACITIES)
    queues.load_state_dict(states[0])
    assert_same_multisets(queues, deques)
