"""Non-finite steps (issue 25 item 2, engine/guard.py): a step whose loss or gradients are not finite is skipped (no
optimiser, EMA, BatchNorm-statistics or queue change), counted, and N in a row stop the run naming the steps, their
samples and the last good checkpoint."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from digests import state_digests
from u2pl_scale.config import load_config
from u2pl_scale.engine import guard as guard_module
from u2pl_scale.engine import trainer as trainer_module
from u2pl_scale.engine.guard import NonFiniteLossError, StepGuard
from u2pl_scale.method import ema
from u2pl_scale.method.queues import ClassQueues

REPO = Path(__file__).resolve().parents[2]


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 6, 6, generator=g) for _ in range(3)]


def everything(net, optimizer) -> list[torch.Tensor]:
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return [t.detach().clone() for t in (*net.parameters(), *net.buffers(), *state)]


def train_steps(net, optimizer, xs, poisoned=(), device_side=None, teacher=None):
    """Plain training steps through the guard, the step of each index in `poisoned` with a NaN input."""
    guard = StepGuard([m for m in (net, teacher) if m is not None], optimizer, torch.device("cpu"), 1, 3, history=4)
    if device_side is not None:
        guard.device_side = device_side
        if device_side:
            guard_module._materialise_momentum(optimizer)
    flags, good = [], 0
    for i, x in enumerate(xs):
        guard.begin(i, [f"sample{i}"])
        if i in poisoned:
            x = torch.full_like(x, float("nan"))
        loss = net(x).square().mean()
        if teacher is not None:
            with torch.no_grad():
                teacher.train()(x)  # moves the teacher's BN statistics, as the step's teacher forward does
        loss.backward()
        flags.append(bool(guard.check(loss, net.parameters())))
        guard.optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None and not guard.skip_on_host():
            ema.update_(teacher, net, good, 0.99, gate=guard.ema_gate())  # k: good steps, to match the reference
        good += not flags[-1]
        guard.end(i)
    return flags


@pytest.mark.parametrize("path", ["host", "device-side"])
def test_a_poisoned_step_changes_nothing(path):
    """Reference: the same net trained on the good batches only. With the poisoned batch in the middle (and first),
    every parameter, BN buffer and optimiser tensor must equal the reference's bit for bit, and the teacher too."""
    xs = batches()
    device_side = path == "device-side"

    def run(poisoned, steps):
        net = tiny_net()
        net(xs[0])  # materialise the lazy layer
        teacher = copy.deepcopy(net)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=device_side or None,
                                    foreach=None if device_side else True)
        flags = train_steps(net, optimizer, steps, poisoned, device_side, teacher)
        return flags, everything(net, optimizer), [t.clone() for t in (*teacher.parameters(), *teacher.buffers())]

    for position in (0, 1):  # a poisoned first step (no momentum yet) and one in the middle
        steps = xs[:position] + [xs[0]] + xs[position:]
        flags, got, got_teacher = run({position}, steps)
        _, want, want_teacher = run(set(), xs)
        assert flags == [i == position for i in range(len(steps))]
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        assert len(got_teacher) == len(want_teacher) and all(torch.equal(a, b) for a, b in zip(got_teacher,
                                                                                               want_teacher))


def test_a_nonfinite_row_never_enters_the_queues():
    """A push with an inf row and a NaN row leaves the queues as a push of the finite rows alone does."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(6, 4, generator=g)
    mask = torch.rand(6, 3, generator=g) > 0.3
    poisoned = rows.clone()
    poisoned[1, 2], poisoned[4, 0] = float("inf"), float("nan")
    got, want = ClassQueues(3, 4, 5), ClassQueues(3, 4, 5)
    got.push(poisoned, mask)
    keep = torch.tensor([True, False, True, True, False, True])
    want.push(rows[keep], mask[keep])
    for key, tensor in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], tensor), key
    packed = ClassQueues(3, 4, 5).pack(poisoned, mask, world_size=2)
    assert torch.isfinite(packed).all()  # pack draws only finite rows


def _two_ranks(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    net = tiny_net()
    net(batches()[0])
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=True)
    guard = StepGuard([net], optimizer, torch.device("cpu"), 2, 3, history=4)
    flags = []
    for i, x in enumerate(batches()):
        guard.begin(i, [])
        loss = ddp(x).square().mean()
        if rank == 1 and i == 1:
            loss = loss + float("inf") * loss.detach()  # rank 1 only: a non-finite loss whose gradient is finite
        loss.backward()
        flags.append(bool(guard.check(loss, net.parameters())))
        guard.optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        guard.end(i)
    torch.save({"flags": flags, "params": [p.detach() for p in net.parameters()]}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_skip_together(tmp_path):
    """A non-finite loss on one rank of two (its gradients finite) skips the step on both: same flags, same
    parameters on both ranks afterwards."""
    from net import free_port

    mp.start_processes(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["flags"] == b["flags"] == [False, True, False]
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


# ---- the trainer ---------------------------------------------------------------------------------------------------
TINY = ["train.progress_bar=false", "model.backbone=resnet10t", "data.steps_per_epoch=4", "train.epochs=2",
        "data.batch_size_labeled=2", "data.batch_size_unlabeled=2", "data.num_workers=0", "data.crop_size=48",
        "method.contrastive.num_anchors=16", "method.contrastive.queue_size=500", "eval.num_pictures=0",
        "eval.interval_epochs=2", "train.log_interval=2", "train.checkpoint_interval=1", "train.keep_checkpoints=20"]


def poison_steps(monkeypatch, steps: set) -> None:
    """The normalised images of the given steps (0-based) become NaN, labeled and unlabeled."""
    current = {}
    begin, u2pl_step, supervised_step = StepGuard.begin, trainer_module.u2pl_step, trainer_module.supervised_step

    def recording_begin(self, step, keys):
        current["step"] = step
        return begin(self, step, keys)

    def nan_if_poisoned(x):
        return torch.full_like(x, float("nan")) if current.get("step") in steps else x

    def poisoned_u2pl(sc, student, teacher, queues, x_l, y_l, x_u, *rest, **kwargs):
        return u2pl_step(sc, student, teacher, queues, nan_if_poisoned(x_l), y_l, nan_if_poisoned(x_u), *rest,
                         **kwargs)

    def poisoned_supervised(sc, student, x_l, *rest):
        return supervised_step(sc, student, nan_if_poisoned(x_l), *rest)

    monkeypatch.setattr(StepGuard, "begin", recording_begin)
    monkeypatch.setattr(trainer_module, "u2pl_step", poisoned_u2pl)
    monkeypatch.setattr(trainer_module, "supervised_step", poisoned_supervised)


def test_a_poisoned_u2pl_step_is_skipped_and_counted(demo_shards, tmp_path, monkeypatch):
    """Step 6 (0-based 5: a U2PL step) gets NaN images: the checkpoint after it holds the weights, teacher and queues
    of the one before it, its optimiser tensors too; the run goes on and counts one skipped step."""
    poison_steps(monkeypatch, {5})
    summary = trainer_module.train(load_config(REPO / "configs" / "demo.yaml",
                                               TINY + [f"train.run_dir={tmp_path}"]))
    ckpts = tmp_path / "checkpoints"
    before, after = (state_digests(ckpts / f"step_{s:08d}" / "state.pt") for s in (5, 6))
    unchanged = ("model", "teacher", "queues")
    assert {k: before[k] for k in unchanged} == {k: after[k] for k in unchanged}
    states = [torch.load(ckpts / f"step_{s:08d}" / "state.pt", weights_only=True)["backend"]["optimizer"]["state"]
              for s in (5, 6)]
    assert states[0].keys() == states[1].keys() and all(
        torch.equal(states[0][k]["momentum_buffer"], states[1][k]["momentum_buffer"]) for k in states[0])
    following = state_digests(ckpts / "step_00000007" / "state.pt")
    assert following["model"] != after["model"]  # the next step trains again
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 8
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_interval = {m["step"]: m["nonfinite"] for m in logged if m.get("kind") == "train"}
    assert per_interval == {2: 0.0, 4: 0.0, 6: 1.0, 8: 0.0}


def test_n_nonfinite_steps_in_a_row_stop_the_run_naming_steps_samples_and_checkpoint(demo_shards, tmp_path,
                                                                                      monkeypatch):
    """From step 3 on (0-based 2) every step is poisoned; N = 3 stops at the log step after the third, naming steps
    3..5, their samples (2 labeled + 2 unlabeled each in the U2PL epoch, 2 in the supervised one) and the newest
    checkpoint, which holds the state of step 2."""
    poison_steps(monkeypatch, set(range(2, 100)))
    with pytest.raises(NonFiniteLossError) as raised:
        trainer_module.train(load_config(REPO / "configs" / "demo.yaml", TINY + [
            f"train.run_dir={tmp_path}", "train.max_consecutive_nonfinite=3", "train.checkpoint_interval=2"]))
    message = str(raised.value)
    assert "steps 3..5" in message
    keys = re.search(r"Samples of those steps on rank 0: (.*?)\. Last good", message).group(1).split(", ")
    assert len(keys) == 2 + 2 + 4 and len(set(keys)) >= 4  # steps 3, 4 supervised (2 labeled); 5 U2PL (2 + 2)
    assert all(re.fullmatch(r"train_\d{6}", k) for k in keys)  # the demo's sample keys
    newest = sorted((tmp_path / "checkpoints").iterdir())[-1]
    assert f"Last good checkpoint: {newest} " in message
    assert state_digests(newest / "state.pt")["model"] == state_digests(
        tmp_path / "checkpoints" / "step_00000002" / "state.pt")["model"]  # skipped steps changed nothing


def test_the_setting_is_checked():
    from u2pl_scale.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_consecutive_nonfinite"):
        load_config(REPO / "configs" / "demo.yaml", ["train.max_consecutive_nonfinite=-1"])


def _deepspeed_rank(rank: int, port: int, out: str) -> None:
    """One rank of a 1-rank DeepSpeed engine: a poisoned loss skips backward and step, the LR schedule advances."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from u2pl_scale.engine.backends import DeepSpeedBackend

    net = tiny_net()
    net(batches()[0])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    backend = DeepSpeedBackend(net, optimizer, scheduler, torch.device("cpu"), "fp32", 0.0, 1, 2)
    guard = StepGuard([backend.module], backend.optimizer, torch.device("cpu"), 1, 3, history=4)
    before = [p.detach().clone() for p in backend.module.parameters()]
    lrs, flags = [backend.lr], []
    for i, x in enumerate(batches()[:2]):
        guard.begin(i, [])
        loss = backend.forward_model(x).square().mean() * (float("nan") if i == 0 else 1.0)
        backend.backward_and_step(loss, guard)
        flags.append(bool(guard.bad))
        if i == 0:
            skipped = [p.detach().clone() for p in backend.module.parameters()]
        guard.end(i)
        lrs.append(backend.lr)
    after = [p.detach().clone() for p in backend.module.parameters()]
    torch.save({"flags": flags, "unchanged": all(torch.equal(a, b) for a, b in zip(before, skipped)),
                "moved": any(not torch.equal(a, b) for a, b in zip(skipped, after)), "lrs": lrs}, f"{out}/ds.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_skips_a_nonfinite_step(tmp_path):
    pytest.importorskip("deepspeed")
    from net import free_port

    mp.start_processes(_deepspeed_rank, args=(free_port(), str(tmp_path)), nprocs=1, start_method="spawn")
    got = torch.load(tmp_path / "ds.pt", weights_only=True)
    assert got["flags"] == [True, False] and got["unchanged"] and got["moved"]
    assert got["lrs"] == pytest.approx([0.1, 0.05, 0.1 / 3])  # the schedule advanced on the skipped step too
