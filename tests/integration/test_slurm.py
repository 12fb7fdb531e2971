"""launchers/slurm.py on a REAL one-node Slurm (tests/cluster/slurm_local.sh): 2 CPU tasks (gloo) train demo steps;
a job requeued mid-training resumes from its checkpoint and ends at the same step as an uninterrupted run."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digests import state_digests

REPO = Path(__file__).resolve().parents[2]
# run with pytest-xdist (-n 2 --dist loadgroup, the README command): these tests stay on one worker, in order:
# one worker holds the Slurm that the session fixture starts and stops
pytestmark = pytest.mark.xdist_group("slurm")
LAUNCHER = REPO / "launchers" / "slurm.py"
STEPS = 16
# 8 supervised warm-up steps, then 8 U2PL steps (queues all-gathered across the 2 ranks); small checkpoints.
# Enough steps after the first checkpoint (step 2) that the requeue reaches the job while it still trains.
TRAIN = [f"train.max_steps={STEPS}", "data.steps_per_epoch=8", "train.epochs=2", "train.checkpoint_interval=2",
         "train.log_interval=2", "eval.interval_epochs=2", "eval.num_pictures=2", "train.progress_bar=false",
         "data.batch_size_labeled=4", "data.batch_size_unlabeled=4", "data.num_workers=0",
         "method.contrastive.num_anchors=32", "method.contrastive.queue_size=2000"]


def _load_launcher():
    spec = importlib.util.spec_from_file_location("slurm_launcher", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_map_to_submitit_parameters():
    launcher = _load_launcher()
    parse = launcher.build_parser().parse_args
    gpu = launcher.executor_parameters(parse(
        ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "90", "--account", "proj",
         "--qos", "high", "--constraint", "a100", "--mem", "64", "--job-name", "voc", "train.epochs=3"]))
    assert gpu == {"nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 8, "timeout_min": 90,
                   "name": "voc", "slurm_partition": "gpu", "slurm_account": "proj", "slurm_qos": "high",
                   "slurm_constraint": "a100", "mem_gb": 64}
    cpu = launcher.executor_parameters(parse(["--cpu", "--ntasks-per-node", "3", "--mem", "0"]))
    assert cpu["tasks_per_node"] == 3 and cpu["cpus_per_task"] == 1 and "gpus_per_node" not in cpu
    assert cpu["slurm_mem"] == "0"


def test_bad_override_fails_before_submitting(tmp_path):
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--cpu", "train.epochz=3"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "train.epochz" in proc.stderr and "submitted" not in proc.stdout


def test_the_script_kills_only_its_own_job_steps(tmp_path):
    """stop kills the slurmstepd processes of its own cluster (they run in its directory), not another's."""
    import os
    import shutil
    script = REPO / "tests" / "cluster" / "slurm_local.sh"
    own_dir = Path(os.environ.get("U2PL_SLURM_DIR", "/var/tmp/u2pl-slurm"))
    own_dir.mkdir(parents=True, exist_ok=True)
    fake = tmp_path / "slurmstepd"  # a process named slurmstepd
    shutil.copy("/bin/sleep", fake)
    foreign = subprocess.Popen([str(fake), "60"], cwd=tmp_path)
    ours = subprocess.Popen([str(fake), "60"], cwd=own_dir)
    try:
        time.sleep(0.3)
        listed = subprocess.run([str(script), "steps"], capture_output=True, text=True, timeout=30).stdout.split()
        assert str(ours.pid) in listed and str(foreign.pid) not in listed
    finally:
        foreign.kill()
        ours.kill()


def launch(tmp: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(LAUNCHER), "--nodes", "1", "--cpu", "--ntasks-per-node", "2",
           "--config", str(REPO / "configs" / "demo.yaml"), "--folder", str(tmp / "slurm" / "%j"),
           f"train.run_dir={tmp / 'run'}", *TRAIN, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\d+)", stdout)
    assert m, stdout
    return m.group(1)


def task_logs(tmp: Path, jid: str) -> str:
    return "".join(p.read_text() for p in sorted((tmp / "slurm" / jid).glob(f"{jid}_*_log.*")))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, demo_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_plain")
    proc = launch(tmp, "--wait")
    jid = job_id(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr + task_logs(tmp, jid)
    return tmp, jid, proc


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_task_cpu_job_trains(uninterrupted):
    tmp, jid, proc = uninterrupted
    assert f"logs: {tmp / 'slurm' / jid}" in proc.stdout  # tells the user where the logs go
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2 and summary["resumed_from"] is None
    assert summary["miou"] is not None
    assert '"steps": %d' % STEPS in proc.stdout  # --wait printed the summary
    logs = task_logs(tmp, jid)
    assert "rank source: slurm, backend: gloo" in logs  # two srun tasks joined one gloo group via Slurm vars
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir() if p.name.startswith("step_"))[-1] \
        == f"step_{STEPS:08d}"


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_evaluate_job_on_two_tasks_reproduces_the_trainers_figure(uninterrupted):
    """--evaluate runs launchers/evaluate.py's evaluation as two Slurm tasks of one gloo group: the same confusion
    matrix, so exactly the mIoU the 2-rank training's final evaluation gave (best.pt is that evaluation)."""
    tmp, _, _ = uninterrupted
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["miou"] == summary["best_miou"]
    cmd = [sys.executable, str(LAUNCHER), "--nodes", "1", "--cpu", "--ntasks-per-node", "2",
           "--folder", str(tmp / "slurm_eval" / "%j"), "--wait", "--evaluate", "--",
           "--checkpoint", "run", "--data", str(REPO / "shards" / "demo" / "val"), "--out", "eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp)  # relative paths: from tmp
    logs = "".join(p.read_text() for p in sorted((tmp / "slurm_eval").rglob("*_log.*")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    rep = json.loads((tmp / "eval" / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["images"] == 128 and rep["eval_mode"] == "whole"
    assert rep["miou"] == summary["miou"] and list(rep["per_class_iou"].values()) == summary["per_class_iou"]
    assert f'"miou": {summary["miou"]}' in proc.stdout  # --wait printed task 0's result


def test_evaluate_arguments_are_checked_before_submitting(tmp_path):
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--cpu", "--evaluate", "--", "--checkpoint",
                           str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "nothing does not exist" in proc.stderr and "submitted" not in proc.stdout


def _squeue_state(jid: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T %r"], capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("interrupt", ["scontrol_requeue", "preempt_usr2"])
def test_requeued_job_resumes_from_checkpoint(uninterrupted, tmp_path, interrupt):
    """scontrol_requeue: Slurm kills and requeues the job itself. preempt_usr2: the signal Slurm sends before
    preemption/time-out; submitit calls TrainJob.checkpoint() and requeues the DelayedSubmission it returns."""
    proc = launch(tmp_path)  # no --wait: submit and return
    assert proc.returncode == 0, proc.stderr
    jid = job_id(proc.stdout)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())):
        assert time.time() < deadline, "no checkpoint appeared:\n" + task_logs(tmp_path, jid)
        assert not (tmp_path / "run" / "summary.json").exists(), "job finished before it could be requeued"
        time.sleep(0.3)
    if interrupt == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", jid], check=True, capture_output=True)
    else:
        subprocess.run(["scancel", "--signal=USR2", jid], check=True, capture_output=True)
    # Slurm holds a requeued job (BeginTime, about 2 minutes): release it now
    deadline = time.time() + 120
    while True:
        state = _squeue_state(jid)
        if state.startswith("PENDING"):
            subprocess.run(["scontrol", "update", f"jobid={jid}", "starttime=now"], capture_output=True)
        if state.startswith("RUNNING") and "(restart 1)" in task_logs(tmp_path, jid):
            break
        assert time.time() < deadline, f"requeued job did not restart (state {state!r})"
        time.sleep(0.5)
    follow = subprocess.run([sys.executable, str(LAUNCHER), "--follow", jid, "--folder",
                             str(tmp_path / "slurm" / "%j")], capture_output=True, text=True, timeout=300)
    logs = task_logs(tmp_path, jid)
    assert follow.returncode == 0, follow.stdout + follow.stderr + logs
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    plain = json.loads((uninterrupted[0] / "run" / "summary.json").read_text())
    assert summary["steps"] == plain["steps"] == STEPS
    assert summary["resumed_from"] and "step_" in summary["resumed_from"]
    # exact resume: the requeued job ends with the uninterrupted job's weights, teacher, queues and optimiser
    last = f"step_{STEPS:08d}"
    assert state_digests(tmp_path / "run" / "checkpoints" / last / "state.pt") == \
        state_digests(uninterrupted[0] / "run" / "checkpoints" / last / "state.pt")
    assert (summary["miou"], summary["per_class_iou"]) == (plain["miou"], plain["per_class_iou"])
    assert "DUE TO JOB REQUEUE" in logs
    if interrupt == "preempt_usr2":
        assert "Calling checkpoint method" in logs and "[slurm] preempted or timed out: requeuing" in logs
    assert re.search(r"\(restart 1\): resuming from \S+step_\d{8}", logs), logs
    assert "[u2pl] resumed from" in logs
