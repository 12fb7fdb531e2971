"""Training across four "hosts" on one machine: network namespaces with their own addresses and host names
(tests/cluster/netns.sh) run a REAL four-node Slurm (slurm_multinode.sh) and a REAL four-node Ray (ray_multinode.sh).

torchrun --nnodes 4 inside an sbatch allocation and launchers/slurm.py --nodes 4 (requeued mid-run) place one rank
on each host and end at the same state (up to float rounding: assert_same_state says why); launchers/ray_train.py
--num-workers 4 does the same placement and recovers from a worker killed on one of the hosts. Every rank writes
{run_dir}/ranks/rank{R}.json (host name, rank variables); the host names and addresses they are checked against are
the harness's (nodeK at <net>.K)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "cluster"
SLURM_LAUNCHER = REPO / "launchers" / "slurm.py"
RAY_LAUNCHER = REPO / "launchers" / "ray_train.py"
HOSTS = [f"node{k}" for k in range(1, 5)]
RAY_NETNS, RAY_NET = "u2r", "10.77.1"  # ray_multinode.sh's set of hosts (netns.sh): u2r-nodeK at 10.77.1.K
STEPS = 16
LAST = f"step_{STEPS:08d}"
# resnet10t at 48 px, one thread per rank: the cheapest real steps. 4 supervised warm-up steps, then 12 U2PL steps
# (queues all-gathered over the 4 ranks); checkpoints every 2 steps, one evaluation at the end.
TRAIN = ["model.backbone=resnet10t", "data.crop_size=48", f"train.max_steps={STEPS}", "data.steps_per_epoch=4",
         "train.epochs=4", "train.checkpoint_interval=2", "train.log_interval=2", "eval.interval_epochs=4",
         "eval.num_pictures=2", "train.progress_bar=false", "data.batch_size_labeled=4",
         "data.batch_size_unlabeled=4", "data.num_workers=0", "method.contrastive.num_anchors=32",
         "method.contrastive.queue_size=2000", "train.device=cpu", "train.num_threads=1"]
slurm_group = pytest.mark.xdist_group("slurm")  # one Slurm test at a time: the clusters share munged and cores
ray_group = pytest.mark.xdist_group("ray")  # test_ray.py counts the machine's Ray Train workers: not meanwhile


def rank_records(run_dir: Path) -> dict[int, dict]:
    records = {}
    for path in sorted((run_dir / "ranks").glob("rank*.json")):
        record = json.loads(path.read_text())
        assert path.name == f"rank{record['RANK']}.json"
        records[record["RANK"]] = record
    return records


def check_placement(records: dict[int, dict]) -> None:
    """Four ranks, one on each host, each with a distinct node rank (one task per node: local rank 0)."""
    assert sorted(records) == [0, 1, 2, 3], records
    assert sorted(r["hostname"] for r in records.values()) == HOSTS
    assert sorted(r["NODE_RANK"] for r in records.values()) == [0, 1, 2, 3]
    assert all(r["LOCAL_RANK"] == 0 and r["WORLD_SIZE"] == 4 and r["backend"] == "gloo" for r in records.values())


def check_queues(run_dir: Path, summary: dict) -> None:
    """The queues every rank held at the end are the ones rank 0 saved: same sha256 of contents and pointers,
    computed here from the final checkpoint; and the U2PL steps did fill them."""
    queues = torch.load(run_dir / "checkpoints" / LAST / "state.pt", map_location="cpu", weights_only=True)["queues"]
    h = hashlib.sha256()
    for name in ("buffer", "write_ptr", "fill"):
        h.update(queues[name].contiguous().view(torch.uint8).numpy().tobytes())
    assert int(queues["fill"].sum()) > 0
    assert summary["queue_digests"] == [h.hexdigest()] * 4


def _leaves(x, name=""):
    if isinstance(x, dict):
        for key in sorted(x, key=str):
            yield from _leaves(x[key], f"{name}.{key}")
    elif isinstance(x, (list, tuple)):
        for i, item in enumerate(x):
            yield from _leaves(item, f"{name}[{i}]")
    else:
        yield name, x


def assert_same_state(path: Path, reference: Path) -> None:
    """Checkpoints equal bit for bit: weights, teacher, optimiser and schedule, queues (engine/backends.py sums the
    gradients of more than 2 gloo ranks in rank order, so a resumed run's first step adds them as the uninterrupted
    run did)."""
    a = torch.load(path, map_location="cpu", weights_only=True)
    b = torch.load(reference, map_location="cpu", weights_only=True)
    for part in ("model", "teacher", "backend", "queues"):
        left, right = list(_leaves(a[part], part)), list(_leaves(b[part], part))
        assert [n for n, _ in left] == [n for n, _ in right]
        for (name, x), (_, y) in zip(left, right):
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
            else:
                assert x == y, name


def test_rank_record_names_the_host_and_the_launchers_numbers(tmp_path, monkeypatch):
    """dist.write_rank_record (the trainer calls it after joining the group): this process's host name and pid,
    the rank numbers of the group, the node rank as the launcher numbers nodes (torchrun's GROUP_RANK before
    Slurm's SLURM_NODEID)."""
    import socket

    from u2pl_scale import dist

    for name in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    info = dist.DistInfo(5, 8, 1, "gloo", torch.device("cpu"), "slurm")
    dist.write_rank_record(tmp_path, info)
    record = json.loads((tmp_path / "ranks" / "rank5.json").read_text())
    assert record["hostname"] == socket.gethostname() and record["pid"] == os.getpid()
    assert [record[k] for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")] \
        == [5, 1, 2, 8, "node1", None]
    monkeypatch.setenv("GROUP_RANK", "3")
    dist.write_rank_record(tmp_path, info)  # rewritten, as by a restarted rank
    assert json.loads((tmp_path / "ranks" / "rank5.json").read_text())["NODE_RANK"] == 3
    assert [p.name for p in (tmp_path / "ranks").iterdir()] == ["rank5.json"]  # no temporaries left


@slurm_group
@pytest.mark.cluster
def test_namespaces_are_hosts_with_their_own_names_and_addresses(slurm_four_nodes):
    """Each nodeK has host name nodeK and the one address 10.77.0.K; names resolve to the harness's addresses inside
    every host; and this machine keeps its own host name."""
    probe = ("import socket, subprocess; print(socket.gethostname(), socket.gethostbyname('node3'), "
             "subprocess.run(['ip', '-4', '-o', 'addr', 'show', 'eth0'], capture_output=True, text=True)"
             ".stdout.split()[3])")
    for k in range(1, 5):
        out = subprocess.run([str(CLUSTER / "slurm_multinode.sh"), "run", str(k), sys.executable, "-c", probe],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [f"node{k}", "10.77.0.3", f"10.77.0.{k}/24"]
    assert os.uname().nodename not in HOSTS


# ---- Slurm: torchrun --nnodes 4 in an sbatch allocation; launchers/slurm.py --nodes 4 with a requeue ----------

@pytest.fixture(scope="module")
def torchrun_run(slurm_four_nodes, demo_shards, tmp_path_factory):
    """sbatch --nodes 4: one torchrun per node (srun), rendezvous (c10d) on node1, one rank each, running
    launchers/local.py; uninterrupted, the reference the requeued Slurm job must end at."""
    tmp = tmp_path_factory.mktemp("torchrun4")
    script = tmp / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes=4 --ntasks-per-node=1 --cpus-per-task=1 --output={tmp}/%j.out --job-name=torchrun4\n"
        f"srun --kill-on-bad-exit=1 {sys.executable} -m torch.distributed.run --nnodes 4 --nproc-per-node 1 "
        '--rdzv-backend c10d --rdzv-endpoint node1:29400 --rdzv-id "$SLURM_JOB_ID" '
        f'launchers/local.py --config configs/demo.yaml "$@"\n')
    proc = subprocess.run(["sbatch", "--wait", "--parsable", str(script), f"train.run_dir={tmp / 'run'}", *TRAIN],
                          capture_output=True, text=True, timeout=420, cwd=REPO, env=slurm_four_nodes)
    log = "".join(p.read_text() for p in tmp.glob("*.out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-6000:]
    return tmp / "run", log


@slurm_group
@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_nnodes_4_in_an_sbatch_allocation(torchrun_run):
    run_dir, log = torchrun_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 4 and summary["resumed_from"] is None
    records = rank_records(run_dir)
    check_placement(records)
    # torchrun's numbering: node (agent) rank x 1 process per node; the master is rank 0's agent's host
    assert all(r["RANK"] == r["NODE_RANK"] and r["source"] == "env" for r in records.values())
    assert all(r["MASTER_ADDR"] == records[0]["hostname"] for r in records.values())
    assert "rank source: env, backend: gloo" in log
    check_queues(run_dir, summary)


def _submit(tmp: Path, env: dict) -> str:
    cmd = [sys.executable, str(SLURM_LAUNCHER), "--nodes", "4", "--cpu", "--ntasks-per-node", "1",
           "--config", str(REPO / "configs" / "demo.yaml"), "--folder", str(tmp / "slurm" / "%j"),
           f"train.run_dir={tmp / 'run'}", *TRAIN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"submitted job (\d+): 4 node\(s\) x 1 task\(s\) = 4 rank\(s\)", proc.stdout)
    assert m, proc.stdout
    return m.group(1)


def _task_logs(tmp: Path, jid: str) -> str:
    return "".join(p.read_text() for p in sorted((tmp / "slurm" / jid).glob(f"{jid}_*_log.*")))


@slurm_group
@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_launcher_on_four_nodes_resumes_a_requeue(slurm_four_nodes, torchrun_run, tmp_path):
    env = slurm_four_nodes
    jid = _submit(tmp_path, env)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())):
        assert time.time() < deadline, "no checkpoint appeared:\n" + _task_logs(tmp_path, jid)
        assert not (run_dir / "summary.json").exists(), "job finished before it could be requeued"
        time.sleep(0.3)
    first = rank_records(run_dir)
    check_placement(first)
    subprocess.run(["scontrol", "requeue", jid], check=True, capture_output=True, env=env)
    deadline = time.time() + 180
    while True:  # Slurm holds a requeued job (BeginTime, about 2 minutes): release it now
        state = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True,
                               env=env).stdout.strip()
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={jid}", "starttime=now"], capture_output=True, env=env)
        if state == "RUNNING" and "(restart 1)" in _task_logs(tmp_path, jid):
            break
        assert time.time() < deadline, f"requeued job did not restart (state {state!r})"
        time.sleep(0.5)
    follow = subprocess.run([sys.executable, str(SLURM_LAUNCHER), "--follow", jid, "--folder",
                             str(tmp_path / "slurm" / "%j")], capture_output=True, text=True, timeout=400, env=env)
    logs = _task_logs(tmp_path, jid)
    assert follow.returncode == 0, follow.stdout + follow.stderr + logs[-6000:]
    assert "DUE TO JOB REQUEUE" in logs and re.search(r"\(restart 1\): resuming from \S+step_\d{8}", logs)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 4
    assert summary["resumed_from"] and "step_" in summary["resumed_from"]
    records = rank_records(run_dir)
    check_placement(records)
    # Slurm's numbering: block distribution over node[1-4], so nodeK is node rank K-1 and holds rank K-1
    for rank, r in records.items():
        assert r["NODE_RANK"] == HOSTS.index(r["hostname"]) == rank and r["source"] == "slurm"
        assert r["MASTER_ADDR"] == "node1"  # the first host of the step's node list
        assert r["pid"] != first[rank]["pid"]  # written by the requeued job's processes
    check_queues(run_dir, summary)
    # the resumed run ends where torchrun's uninterrupted run ends: weights, teacher, optimiser and queues
    assert_same_state(run_dir / "checkpoints" / LAST / "state.pt", torchrun_run[0] / "checkpoints" / LAST / "state.pt")


# ---- Ray: a head and three workers, launchers/ray_train.py --num-workers 4, one worker killed -----------------

def _netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


@ray_group
@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_train_on_four_nodes_recovers_from_a_killed_worker(ray_four_nodes, demo_shards, tmp_path):
    """One Ray Train worker per node; SIGKILL from outside to the one on node3 mid-run (as a node failure would):
    Ray restarts the group, which resumes from the last reported checkpoint, again one rank per node."""
    storage = tmp_path / "ray"
    cmd = [str(CLUSTER / "ray_multinode.sh"), "run", "1", sys.executable, str(RAY_LAUNCHER), "--address",
           ray_four_nodes, "--num-workers", "4", "--cpus-per-worker", "1", "--config",
           str(REPO / "configs" / "demo.yaml"), "--storage-path", str(storage), "--name", "t", *TRAIN]
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver.log"  # a file, not a pipe: four workers' forwarded logs must never block the driver
    with open(log, "w") as sink:
        job = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    run_dir = storage / "t" / "run"
    try:
        deadline = time.time() + 480
        while not (run_dir / "checkpoints" / "step_00000006").is_dir():  # checkpoints 2 and 4 reported by then
            assert job.poll() is None and time.time() < deadline, "no checkpoint at step 6"
            time.sleep(0.05)
        first = rank_records(run_dir)
        check_placement(first)
        victim = next(r for r in first.values() if r["hostname"] == "node3")
        # the rank's own pid: a Ray Train worker process in node3's network namespace
        assert Path(f"/proc/{victim['pid']}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker")
        assert os.stat(f"/proc/{victim['pid']}/ns/net").st_ino == _netns_inode(f"{RAY_NETNS}-node3")
        os.kill(victim["pid"], signal.SIGKILL)
        job.wait(timeout=700)
    finally:
        if job.poll() is None:
            job.kill()
        out = log.read_text()
        print(out[-20000:])  # pytest shows it when an assertion of this test fails
    assert job.returncode == 0
    m = re.search(r"\[u2pl\] resumed from (\S+) at step (\d+)", out)
    assert m and 2 <= int(m.group(2)) <= 6
    assert "/ray/t/checkpoint_" in m.group(1)  # Ray's copy (ray.train.get_checkpoint), not the local run dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 4 and summary["resumed_from"] == m.group(1)
    records = rank_records(run_dir)
    check_placement(records)
    for rank, r in records.items():
        assert r["source"] == "ray" and r["pid"] != victim["pid"]
        assert r["pid"] not in {f["pid"] for f in first.values()}  # the whole group was restarted
        # the group's master is rank 0's node: its address in the harness's plan
        assert r["MASTER_ADDR"] == f"{RAY_NET}.{HOSTS.index(records[0]['hostname']) + 1}"
    check_queues(run_dir, summary)
