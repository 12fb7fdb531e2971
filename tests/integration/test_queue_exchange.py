"""The queue exchange (issue 26): each rank sends at most ceil(capacity_c / W) of its negatives per class, so the
gathered volume per step is bounded by the queues' capacity, not by W x batch pixels; the queues are identical on
every rank and hold every rank's negatives in proportion. Real gloo groups of 2 and 4 ranks."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from net import free_port
from u2pl_scale.method.queues import ClassQueues

CAPACITIES = [12, 8, 32]  # divisible by 2 and 4: budgets 6/4/16 at W=2, 3/2/8 at W=4
PIXELS = 40
DIM = 3


def rank_inputs(rank: int):
    """Rows [rank, row, 7]; every row a negative of classes 0 and 1 (more than any budget); only rows 0 and 1 of
    class 2 (fewer than its budget)."""
    rows = torch.arange(PIXELS, dtype=torch.float32)
    features = torch.stack([torch.full((PIXELS,), float(rank)), rows, torch.full((PIXELS,), 7.0)], dim=1)
    mask = torch.zeros(PIXELS, 3, dtype=torch.bool)
    mask[:, 0] = mask[:, 1] = True
    mask[:2, 2] = True
    return features, mask


def _worker(rank: int, world: int, port: int, out_dir: str, fraction: float = 1.0) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1000 + rank)  # each rank its own draw
        queues = ClassQueues(3, DIM, CAPACITIES, exchange_fraction=fraction)
        features, mask = rank_inputs(rank)
        sent = queues.pack(features, mask, world)
        queues.push_distributed(features, mask)
        torch.save({"state": queues.state_dict(), "sent_bytes": sent.numel() * sent.element_size(),
                    "sent_shape": list(sent.shape)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run(world: int, tmp_path, fraction: float = 1.0) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), fraction), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_queues_identical_and_every_rank_contributes_its_budget(world, tmp_path):
    results = run(world, tmp_path)
    for r in results[1:]:
        for key, value in results[0]["state"].items():
            assert torch.equal(r["state"][key], value), key
    queues = ClassQueues(3, DIM, CAPACITIES)
    queues.load_state_dict(results[0]["state"])
    for c, capacity in enumerate(CAPACITIES):
        held = queues.class_features(c)
        if c < 2:  # more negatives than the budget on every rank: each rank fills exactly its share
            assert held.shape[0] == capacity
            per_rank = torch.bincount(held[:, 0].long(), minlength=world)
            assert per_rank.tolist() == [capacity // world] * world
            for rank in range(world):
                mine = held[held[:, 0] == rank][:, 1]
                assert len(set(mine.tolist())) == mine.numel()  # drawn without replacement
                assert ((mine >= 0) & (mine < PIXELS)).all() and (held[:, 2] == 7).all()
        else:  # fewer than the budget: all of them, rank by rank in pixel order, as the published push
            expected = torch.cat([rank_inputs(rank)[0][:2] for rank in range(world)])
            assert torch.equal(held, expected)


def test_bytes_per_step_do_not_grow_with_the_world(tmp_path):
    """Sent per rank: sum_c ceil(capacity_c / W) rows of dim + 1 values; gathered: W times that. By hand:
    (6 + 4 + 16) x 4 x 4 B x 2 ranks = (3 + 2 + 8) x 4 x 4 B x 4 ranks = 832 B."""
    gathered = {}
    for world in (2, 4):
        (tmp_path / str(world)).mkdir()
        results = run(world, tmp_path / str(world))
        assert {r["sent_bytes"] for r in results} == {results[0]["sent_bytes"]}  # a fixed-size collective
        gathered[world] = world * results[0]["sent_bytes"]
    assert gathered[2] == gathered[4] == (6 + 4 + 16) * (DIM + 1) * 4 * 2


def test_an_exchange_fraction_budgets_the_cluster_per_step(tmp_path):
    """method.contrastive.exchange_fraction = 0.5 at W = 2: ceil(ceil(0.5 x [12, 8, 32]) / 2) = [3, 2, 8] rows per
    rank, (3 + 2 + 8) x 4 x 4 B = 208 B sent; one push leaves 6 / 4 rows in classes 0 / 1 (half from each rank) and all
    4 negatives of class 2 (fewer than its budget). One process with the same fraction keeps the same counts."""
    results = run(2, tmp_path, fraction=0.5)
    assert [r["sent_bytes"] for r in results] == [208, 208]
    queues = ClassQueues(3, DIM, CAPACITIES)
    queues.load_state_dict(results[0]["state"])
    held = [queues.class_features(c) for c in range(3)]
    assert [h.shape[0] for h in held] == [6, 4, 4]
    assert torch.bincount(held[0][:, 0].long()).tolist() == [3, 3]
    alone = ClassQueues(3, DIM, CAPACITIES, exchange_fraction=0.5)
    alone.push_distributed(*rank_inputs(0))  # no process group: the local budget ceil(0.5 x capacity_c)
    assert [alone.class_features(c).shape[0] for c in range(3)] == [6, 4, 2]
    with pytest.raises(ValueError, match="exchange_fraction"):
        ClassQueues(3, DIM, CAPACITIES, exchange_fraction=0.0)
