"""Exact resume (issue 25): a run continued from any checkpoint ends bit for bit where the uninterrupted run ends:
weights, EMA teacher, class queues, optimiser and schedule, and every logged figure (wall-clock fields aside)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from digests import logged, state_digests
from u2pl_scale.config import load_config
from u2pl_scale.engine.trainer import train

REPO = Path(__file__).resolve().parents[2]
# 4 steps per epoch, 3 epochs: epoch 0 supervised, epoch 1 U2PL with the teacher following the student, epoch 2 the
# EMA teacher. An evaluation every epoch (its loader must not disturb the training's randomness), a decoding
# worker per stream (its randomness is (seed, epoch, rank, position)), a checkpoint every 2 steps.
TINY = ["train.progress_bar=false", "model.backbone=resnet10t", "data.steps_per_epoch=4", "train.epochs=3",
        "data.batch_size_labeled=4", "data.batch_size_unlabeled=4", "data.num_workers=1", "data.crop_size=48",
        "method.contrastive.num_anchors=16", "method.contrastive.queue_size=500", "eval.num_pictures=0",
        "eval.interval_epochs=1", "train.log_interval=2", "train.checkpoint_interval=2", "train.keep_checkpoints=20"]
LAST = "step_00000012"


def config(run_dir: Path, *extra: str):
    return load_config(REPO / "configs" / "demo.yaml", TINY + [f"train.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("exact") / "uninterrupted"
    train(config(run_dir))
    return run_dir


@pytest.mark.parametrize("at", [2, 6, 8, 10], ids=["supervised-mid-epoch", "following-teacher", "epoch-end",
                                                   "ema-teacher"])
def test_resume_from_any_checkpoint_is_bit_exact(uninterrupted, tmp_path, at):
    """The run directory of a run killed right after its step-`at` checkpoint: that checkpoint and the log so far.
    Continued with train.resume=auto it must end exactly as the uninterrupted run did."""
    resumed = tmp_path / "resumed"
    name = f"step_{at:08d}"
    shutil.copytree(uninterrupted / "checkpoints" / name, resumed / "checkpoints" / name)
    summary = train(config(resumed, "train.resume=auto"))
    assert summary["resumed_from"] == str(resumed / "checkpoints" / name)
    assert state_digests(resumed / "checkpoints" / LAST / "state.pt") == \
        state_digests(uninterrupted / "checkpoints" / LAST / "state.pt")
    assert logged(resumed) == logged(uninterrupted, after_step=at)  # losses, method figures, every val mIoU
    full = __import__("json").loads((uninterrupted / "summary.json").read_text())
    assert (summary["miou"], summary["best_miou"], summary["per_class_iou"]) == \
        (full["miou"], full["best_miou"], full["per_class_iou"])


def test_a_failed_checkpoint_write_stops_the_run_and_costs_one_checkpoint(uninterrupted, tmp_path, monkeypatch):
    """The step-6 checkpoint cannot be written (disk full): the run stops naming it and the checkpoint that is
    still there (step 4); resumed from that, it ends exactly as the uninterrupted run."""
    from u2pl_scale.engine import checkpoint as ckpt

    real = torch.save

    def save(obj, path, *args, **kwargs):
        if ".tmp_step_00000006" in str(path):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real(obj, path, *args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step_00000006 not written .* still \S+step_00000004$"):
        train(config(run_dir))
    monkeypatch.setattr(ckpt.torch, "save", real)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (2, 4)]
    summary = train(config(run_dir, "train.resume=auto"))
    assert summary["resumed_from"].endswith("step_00000004")
    assert state_digests(run_dir / "checkpoints" / LAST / "state.pt") == \
        state_digests(uninterrupted / "checkpoints" / LAST / "state.pt")


# the demo's resnet18 at 64 px: with resnet10t at 48 px a teacher started from rank 1's own student BN statistics
# instead of rank 0's gave the same final bits, and the 2-rank test would not see that fault
TWO_RANKS = ["model.backbone=resnet18", "data.crop_size=64", "method.contrastive.num_anchors=32",
             "method.contrastive.queue_size=2000", "data.num_workers=0"]


def _local(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launchers" / "local.py"), "--nproc", "2", "--config",
            str(REPO / "configs" / "demo.yaml"), *TINY, *TWO_RANKS, f"train.run_dir={run_dir}", *extra]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_two_ranks_and_resume_auto_is_bit_exact(demo_shards, tmp_path, capsys):
    """Two gloo ranks, killed with SIGKILL after a U2PL checkpoint, continued with train.resume=auto: the same
    final state as an uninterrupted 2-rank run: every rank's RNG is restored, and the teacher rank 0 saves is every
    rank's (without SyncBatchNorm the trainer averages the teacher's BN statistics over the ranks; the evaluation
    tests under Slurm and Ray check that the 2-rank figure is that of the saved teacher)."""
    plain = tmp_path / "plain"
    proc = subprocess.run(_local(plain), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    killed = tmp_path / "killed"
    job = subprocess.Popen(_local(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                           start_new_session=True)  # its own process group: both ranks get the SIGKILL
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000006").is_dir() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "summary.json").exists()
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept and kept[-1] < LAST

    proc = subprocess.run(_local(killed, "train.resume=auto"), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / kept[-1]}" in proc.stdout
    assert state_digests(killed / "checkpoints" / LAST / "state.pt") == \
        state_digests(plain / "checkpoints" / LAST / "state.pt")
    last_plain = [r for r in logged(plain) if r["kind"] == "val"][-1]
    assert [r for r in logged(killed) if r["kind"] == "val"][-1] == last_plain

    # from the warm-up's last checkpoint: the teacher is first copied from the student after the resume
    boundary = tmp_path / "boundary"
    shutil.copytree(plain / "checkpoints" / "step_00000004", boundary / "checkpoints" / "step_00000004")
    proc = subprocess.run(_local(boundary, "train.resume=auto"), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert state_digests(boundary / "checkpoints" / LAST / "state.pt") == \
        state_digests(plain / "checkpoints" / LAST / "state.pt")

    # onto one rank: it continues (weights, teacher, queues, optimiser) and says what is not the 2-rank run's
    one = tmp_path / "one_rank"
    shutil.copytree(plain / "checkpoints" / "step_00000006", one / "checkpoints" / "step_00000006")
    summary = train(config(one, *TWO_RANKS, "train.resume=auto"))
    assert summary["resumed_from"].endswith("step_00000006") and summary["world_size"] == 1
    assert summary["steps"] == summary["total_steps"] == 12  # data.steps_per_epoch is set: the same schedule
    assert "the checkpoint was written by 2 rank(s), this run has 1" in capsys.readouterr().out
