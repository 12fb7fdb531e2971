"""Process-group set-up (env precedence, Slurm variables, hostlists) and the collectives on 2 real gloo ranks."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from net import free_port
from u2pl_scale import dist

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher or Slurm variables (the test machine may itself run inside a Slurm job)."""
    for key in list(os.environ):
        if key in _LAUNCH_VARS or key.startswith("SLURM_"):
            monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    dist.cleanup()


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[008-010]-ib,login", ["n008-ib", "n009-ib", "n010-ib", "login"]),
    ("rack[1-2]n[01-02]", ["rack1n01", "rack1n02", "rack2n01", "rack2n02"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert dist.expand_hostlist(nodelist) == hosts


def test_expand_hostlist_malformed():
    with pytest.raises(ValueError, match="gpu\\[01-03"):
        dist.expand_hostlist("gpu[01-03")


SLURM_TASK = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
              "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]",
              "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_env_from_slurm_task():
    env = dist.env_from_slurm(dict(SLURM_TASK))
    assert env == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(20000 + 1234 * 7 % 20000)}
    # an exported MASTER_ADDR/MASTER_PORT wins over the derived ones
    env = dist.env_from_slurm(dict(SLURM_TASK, MASTER_ADDR="head", MASTER_PORT="4242"))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "4242")


def test_env_from_slurm_step_world_is_the_step():
    # `srun -n 2` inside a 4-task allocation: the step has 2 tasks
    env = dist.env_from_slurm(dict(SLURM_TASK, SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1"))
    assert (env["RANK"], env["WORLD_SIZE"]) == ("1", "2")


def test_env_from_slurm_batch_script_is_not_a_task():
    # the batch script of `sbatch -n 4` has SLURM_PROCID=0/SLURM_NTASKS=4 but no step: one process
    batch = {k: v for k, v in SLURM_TASK.items() if not k.startswith("SLURM_STEP")}
    batch.update(SLURM_PROCID="0", SLURM_NTASKS="4")
    assert dist.env_from_slurm(batch) is None
    assert dist.env_from_slurm({}) is None


def test_single_process_needs_no_env(clean_env):
    info = dist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.backend, info.source) == (0, 1, 0, "none", "single")
    assert info.device == torch.device("cpu") and info.is_main
    assert not torch.distributed.is_initialized()
    assert (dist.get_rank(), dist.get_world_size(), dist.is_dist()) == (0, 1, False)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t.clone()).tolist() == [1.0, 2.0]
    assert dist.all_gather_cat(t).tolist() == [1.0, 2.0]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()


def test_sbatch_batch_script_runs_single(clean_env):
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
                 "SLURM_JOB_NODELIST": "localhost"}.items():
        clean_env.setenv(k, v)
    info = dist.init_distributed("cpu")
    assert (info.world_size, info.source) == (1, "single")


def test_rank_outside_world_is_an_error(clean_env):
    clean_env.setenv("RANK", "2")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK=2 is outside WORLD_SIZE=2"):
        dist.init_distributed("cpu")


def test_cuda_requested_without_gpu_is_clear(clean_env):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dist.init_distributed("cuda")


# ---- two real gloo ranks ------------------------------------------------------------------------------

def _worker(local_index: int, mode: str, port: int, out_dir: str) -> None:
    for key in list(os.environ):
        if key in _LAUNCH_VARS or key.startswith("SLURM_"):
            del os.environ[key]
    if mode == "torchrun_in_sbatch":
        # torchrun inside an sbatch allocation: one Slurm task (PROCID 0 of 1) starts both ranks;
        # RANK/WORLD_SIZE must win, else both processes would think they are rank 0.
        os.environ.update({"SLURM_JOB_ID": "99", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                           "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
                           "SLURM_JOB_NODELIST": "localhost",
                           "RANK": str(local_index), "WORLD_SIZE": "2", "LOCAL_RANK": str(local_index),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    else:  # "slurm": two srun tasks and nothing else
        os.environ.update({"SLURM_JOB_ID": "99", "SLURM_PROCID": str(local_index), "SLURM_NTASKS": "2",
                           "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": str(local_index),
                           "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port)})
    info = dist.init_distributed("cpu", timeout_s=60)
    rank = info.rank
    # rank r contributes rows [[10r, 10r+1], [10r+2, 10r+3]]
    mine = torch.arange(4, dtype=torch.float32).reshape(2, 2) + 10 * rank
    gathered = dist.all_gather_cat(mine)
    summed = dist.all_reduce_sum(torch.tensor([rank + 1.0, 5.0 * rank]))
    obj = dist.broadcast_object({"from": rank, "cfg": [1, 2]} if rank == 0 else None)
    # BatchNorm statistics: rank r's running mean 1 + r, running var 4 + 2r; a SyncBatchNorm layer is left alone
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.SyncBatchNorm(2))
    model[0].running_mean.fill_(1.0 + rank)
    model[0].running_var.fill_(4.0 + 2 * rank)
    model[1].running_mean.fill_(7.0 + rank)
    model[0].num_batches_tracked.fill_(5 + rank)
    dist.average_running_stats_(model)
    averaged = {k: v.clone() for k, v in model.state_dict().items()}
    dist.broadcast_buffers_(model)
    broadcast = {k: v.clone() for k, v in model.state_dict().items()}
    is_dist = dist.is_dist()
    if rank == 0:  # rank 0 still writing its outputs while rank 1 is done
        time.sleep(1.0)
    t_enter = time.time()
    dist.finish(info)
    t_left = time.time()
    torch.save({"rank": rank, "world": info.world_size, "local": info.local_rank, "source": info.source,
                "backend": info.backend, "is_dist": is_dist, "gathered": gathered, "summed": summed,
                "obj": obj, "averaged": averaged, "broadcast": broadcast, "t_enter": t_enter, "t_left": t_left,
                "initialised_after": torch.distributed.is_initialized()}, os.path.join(out_dir, f"{local_index}.pt"))


@pytest.mark.parametrize("mode, source", [("torchrun_in_sbatch", "env"), ("slurm", "slurm")])
def test_two_gloo_ranks(tmp_path, mode, source):
    mp.spawn(_worker, args=(mode, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{i}.pt", weights_only=True) for i in range(2)]
    assert sorted(r["rank"] for r in results) == [0, 1]  # not both rank 0
    expected_gather = torch.tensor([[0.0, 1.0], [2.0, 3.0], [10.0, 11.0], [12.0, 13.0]])
    for i, r in enumerate(results):
        assert (r["rank"], r["local"], r["world"], r["source"], r["backend"], r["is_dist"]) == \
            (i, i, 2, source, "gloo", True)
        assert torch.equal(r["gathered"], expected_gather)
        assert r["summed"].tolist() == [1.0 + 2.0, 0.0 + 5.0]
        assert r["obj"] == {"from": 0, "cfg": [1, 2]}
        a, b = r["averaged"], r["broadcast"]
        assert a["0.running_mean"].tolist() == [1.5] * 3 and a["0.running_var"].tolist() == [5.0] * 3
        assert a["1.running_mean"].tolist() == [7.0 + i] * 2  # SyncBatchNorm's statistics are global already
        assert a["0.num_batches_tracked"].item() == 5 + i  # only means and variances are averaged
        assert b["1.running_mean"].tolist() == [7.0] * 2 and b["0.num_batches_tracked"].item() == 5  # rank 0's
        assert b["0.running_mean"].tolist() == [1.5] * 3
        assert not r["initialised_after"]  # the group init_distributed made is torn down by finish()
    assert results[1]["t_left"] >= results[0]["t_enter"]  # rank 1 waited for the slow rank 0 before tearing down


def test_finish_leaves_a_group_it_did_not_make(clean_env):
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    info = dist.init_distributed("cpu")
    assert info.source == "initialised"
    dist.finish(info)
    assert torch.distributed.is_initialized()  # the owner (Ray Train, a test) tears it down
