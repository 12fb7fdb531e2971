"""launchers/ray_train.py on a REAL local Ray (2 CPU workers, gloo): reports metrics and checkpoints; a worker that
dies mid-run makes Ray restart the group, which resumes from the last reported checkpoint."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# run with pytest-xdist (-n 2 --dist loadgroup, the README command): these tests stay on one worker, in order:
# one local Ray instance at a time
pytestmark = pytest.mark.xdist_group("ray")
LAUNCHER = REPO / "launchers" / "ray_train.py"
QUICK = ["data.steps_per_epoch=4", "train.checkpoint_interval=2", "train.log_interval=1", "eval.interval_epochs=2",
         "eval.num_pictures=2", "train.progress_bar=false", "data.batch_size_labeled=4", "data.batch_size_unlabeled=4",
         "data.num_workers=0", "method.contrastive.num_anchors=32", "method.contrastive.queue_size=2000"]


def launch(tmp: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(LAUNCHER), "--num-workers", "2", "--cpus-per-worker", "1",
           "--config", str(REPO / "configs" / "demo.yaml"), "--storage-path", str(tmp / "ray"), "--name", "t",
           *QUICK, *overrides]
    full_env = dict(os.environ, RAY_DEDUP_LOGS="0", **(env or {}))
    full_env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=REPO, env=full_env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return proc


def reported_checkpoints(tmp: Path) -> list[Path]:
    return sorted(p for p in (tmp / "ray" / "t").glob("checkpoint_*") if p.is_dir())


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_reports_metrics_and_checkpoints(demo_shards, tmp_path):
    proc = launch(tmp_path, "train.max_steps=6", "train.epochs=2")
    out = proc.stdout + proc.stderr
    assert "rank source: ray, backend: gloo" in out  # the group TorchTrainer set up was reused
    final = json.loads(re.search(r"\[ray\] final metrics: (\{.*\})", proc.stdout).group(1))
    assert final["step"] == 6 and final["miou"] is not None  # metrics of the latest reported checkpoint
    ckpts = reported_checkpoints(tmp_path)
    assert ckpts and all((c / "state.pt").is_file() for c in ckpts)
    assert len(ckpts) <= 2  # --keep-checkpoints default
    summary = json.loads((tmp_path / "ray" / "t" / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2 and summary["resumed_from"] is None
    # every worker reported equally often: each log step, each checkpoint (rank 0 attaching it) and once at the end
    reports = [re.findall(rf"Reporting training result \d+: TrainingReport\(checkpoint=(\S+?)[,)].* from rank {rank}",
                          out) for rank in (0, 1)]
    assert len(reports[0]) == len(reports[1]) >= 6 + 1 + 1
    assert set(reports[1]) == {"None"}  # only rank 0 attaches the checkpoint
    n_ckpt = sum(c != "None" for c in reports[0])
    assert n_ckpt >= 3 and n_ckpt == out.count("Checkpoint successfully created")


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_worker_failure_restarts_from_last_reported_checkpoint(demo_shards, tmp_path):
    marker = tmp_path / "crashed.marker"
    proc = launch(tmp_path, "train.max_steps=8", "train.epochs=2",
                  env={"U2PL_TEST_CRASH_AT_STEP": "5", "U2PL_TEST_CRASH_RANK": "1",
                       "U2PL_TEST_CRASH_MARKER": str(marker)})
    out = proc.stdout + proc.stderr
    assert marker.read_text().startswith("rank 1 exited at step 5")
    assert "test fault injection: rank 1 exits at step 5" in out
    # checkpoints were reported at steps 2 and 4 before the crash: the restarted group starts at step 4
    m = re.search(r"\[u2pl\] resumed from (\S+) at step (\d+)", out)
    assert m and int(m.group(2)) == 4, out[-4000:]
    assert "/ray/t/checkpoint_" in m.group(1)  # Ray's copy (ray.train.get_checkpoint), not the local run dir
    summary = json.loads((tmp_path / "ray" / "t" / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["total_steps"] == 8 and summary["resumed_from"] == m.group(1)
    final = json.loads(re.search(r"\[ray\] final metrics: (\{.*\})", proc.stdout).group(1))
    assert final["step"] == 8


def test_unreachable_address_names_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--address", f"127.0.0.1:{port}", "train.max_steps=1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"--address 127.0.0.1:{port}" in proc.stderr and "cannot reach a Ray cluster" in proc.stderr
