"""Checkpoints under faults (issue 25): a write that fails midway leaves the previous checkpoints as they were and
nothing half-written where resume looks; resume=auto takes the newest complete checkpoint and says why it skipped
a newer one. Failures are injected into the writer; 2 gloo ranks check that every rank stops, none waits."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from digests import state_digests
from u2pl_scale import dist
from u2pl_scale.engine import checkpoint as ckpt


def state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 64, generator=gen)}, "teacher": {"w": torch.randn(8, generator=gen)},
            "queues": {"q": torch.randn(4, 3, generator=gen)}, "backend": {"lr": 0.01 * step}, "step": step}


def fail_when(monkeypatch, what: str, exc: Exception) -> None:
    """torch.save inside the checkpoint writer raises `exc` for any file whose path contains `what`."""
    real = torch.save

    def save(obj, path, *args, **kwargs):
        if what in str(path):
            raise exc
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)


def snapshot(root) -> dict:
    return {p.name: state_digests(p / "state.pt") for p in ckpt.list_checkpoints(root)}


@pytest.mark.parametrize("what, exc", [
    ("state.pt", RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")),  # disk full
    ("rng_rank0", PermissionError(13, "Permission denied")),
])
def test_a_failed_write_leaves_the_previous_checkpoints_untouched(tmp_path, monkeypatch, what, exc):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep=2)
    before = snapshot(tmp_path / "checkpoints")
    fail_when(monkeypatch, what, exc)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        ckpt.save_checkpoint(tmp_path, 3, state(3), keep=2)
    message = str(info.value)
    assert "step_00000003 not written (writing:" in message and str(exc) in message
    assert message.endswith(f"the latest complete checkpoint is still {tmp_path / 'checkpoints' / 'step_00000002'}")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert snapshot(tmp_path / "checkpoints") == before  # rotation did not run: both old ones kept, unchanged
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_00000002"


def test_a_failure_while_publishing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, state(1), keep=1)
    before = snapshot(tmp_path / "checkpoints")

    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", no_space)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step_00000002 not written \(completing: .*No space left"):
        ckpt.save_checkpoint(tmp_path, 2, state(2), keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # keep=1 did not delete it
    assert snapshot(tmp_path / "checkpoints") == before


def test_resume_auto_skips_damaged_checkpoints_and_says_why(tmp_path, capsys):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep=3)
    root = tmp_path / "checkpoints"
    listed = __import__("json").loads((root / "step_00000003" / "complete.json").read_text())["files"]
    assert set(listed) == {"rng_rank0.pt", "state.pt"} and listed["state.pt"] == (root / "step_00000003" /
                                                                               "state.pt").stat().st_size
    size = (root / "step_00000003" / "state.pt").stat().st_size
    with open(root / "step_00000003" / "state.pt", "r+b") as f:  # truncated, as by a disk error after the rename
        f.truncate(size // 2)
    (root / "step_00000002" / "rng_rank0.pt").unlink()
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step_00000001"
    out = capsys.readouterr().out
    assert f"skipping checkpoint {root / 'step_00000003'}: state.pt has {size // 2} bytes, complete.json says " \
           f"{size}" in out
    assert f"skipping checkpoint {root / 'step_00000002'}: rng_rank0.pt is missing" in out
    with pytest.raises(FileNotFoundError, match="step_00000003 is incomplete: state.pt has"):
        ckpt.resolve_resume(str(root / "step_00000003"), tmp_path)  # named explicitly: an error, not a fallback


def _rank(index: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(index), WORLD_SIZE="2", LOCAL_RANK=str(index), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = dist.init_distributed("cpu", timeout_s=60)
    ckpt.save_checkpoint(root, 1, state(1))
    real = torch.save

    def save(obj, path, *args, **kwargs):  # rank 1's RNG file cannot be written
        if "rng_rank1" in str(path):
            raise OSError(5, "Input/output error")
        return real(obj, path, *args, **kwargs)

    ckpt.torch.save = save
    try:
        ckpt.save_checkpoint(root, 2, state(2))
        outcome = "written"
    except ckpt.CheckpointWriteError as e:
        outcome = str(e)
    torch.save(outcome, os.path.join(root, f"outcome{index}.txt.pt"))  # not an rng file: written
    dist.finish(info)


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f"outcome{i}.txt.pt", weights_only=True) for i in range(2)]
    assert "Input/output error" in outcomes[1] and "failed on another rank" in outcomes[0]
    assert all("step_00000002 not written (writing:" in o for o in outcomes)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # no .tmp_ left
