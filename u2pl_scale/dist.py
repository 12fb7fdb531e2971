"""Process-group set-up from any launcher, rank helpers and fixed-size collectives.

Precedence (DESIGN.md pitfalls): an already initialised group (Ray Train) > RANK/WORLD_SIZE/LOCAL_RANK
(torchrun, launchers/local.py, DeepSpeed) > Slurm variables (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) >
one plain process that needs no environment at all. NCCL on GPUs, gloo on CPU, one GPU per local rank.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" | "gloo" | "none"
    device: torch.device
    source: str  # "ray" | "env" | "slurm" | "single" | "initialised"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: "a[1,3],b" -> ["a[1,3]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str) -> list[str]:
    m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if not m:
        return [name]
    prefix, ranges, rest = m.groups()
    heads: list[str] = []
    for rng in ranges.split(","):
        rng = rng.strip()
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            width = len(lo) if lo.startswith("0") else 0  # "01-03" keeps zero padding
            heads += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            heads.append(prefix + rng)
    tails = _expand_one(rest)  # several bracket groups: "rack[1-2]n[1-2]"
    return [h + t for h in heads for t in tails]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as "gpu[01-03,07],cpu5" into host names, in Slurm's order."""
    if nodelist.count("[") != nodelist.count("]"):
        raise ValueError(f"malformed Slurm hostlist {nodelist!r}")
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        hosts += _expand_one(part)
    return hosts


def env_from_slurm(environ: Optional[dict] = None) -> Optional[dict]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT derived from Slurm task variables, or None
    when this process is not a task of a Slurm job step.

    The batch script of `sbatch -n 4` also carries SLURM_PROCID=0 and SLURM_NTASKS=4, but it is one process:
    treating it as rank 0 of 4 would wait forever for ranks that never start. Only processes started by
    `srun` (submitit uses it) have a step id, so the step id decides; the world is the step's task count."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env:
        return None
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is None or step in ("batch", "extern", "interactive"):
        return None
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if world is None:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    master = env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0]
    job_id = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
    step_id = int(step) if str(step).isdigit() else 0
    # same port on every task of the step, different for concurrent steps/jobs sharing a node
    port = env.get("MASTER_PORT") or str(20000 + (job_id * 7 + step_id) % 20000)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": world,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": master,
        "MASTER_PORT": port,
    }


def _pick_device(local_rank: int, device_pref: str) -> torch.device:
    if device_pref == "cpu" or (device_pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible to this process")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _ray_local_rank() -> Optional[int]:
    """Local rank from Ray Train's context when this process is a Ray Train worker, else None."""
    if "ray" not in sys.modules:
        return None
    try:
        import ray.train

        return int(ray.train.get_context().get_local_rank())
    except Exception:  # not inside a Ray Train worker
        return None


def init_distributed(device_pref: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join (or create) the process group for this process and pick its device.

    Safe to call again: an initialised group (from Ray Train, a test, or an earlier call) is reused."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        ray_local = _ray_local_rank()
        if "LOCAL_RANK" in os.environ:
            local_rank = int(os.environ["LOCAL_RANK"])
        elif ray_local is not None:
            local_rank = ray_local
        else:
            local_rank = rank % max(1, torch.cuda.device_count())
        device = _pick_device(local_rank, device_pref)
        source = "ray" if ray_local is not None else "initialised"
        return DistInfo(rank, world, local_rank, dist.get_backend(), device, source)
    source = "env"
    launcher_gave_master = "MASTER_ADDR" in os.environ
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        slurm = env_from_slurm()
        if slurm is None:
            device = _pick_device(0, device_pref)
            return DistInfo(0, 1, 0, "none", device, "single")
        # RANK/WORLD_SIZE/LOCAL_RANK were not both given (else we would not be here): take Slurm's;
        # a MASTER_ADDR/MASTER_PORT the user exported wins.
        for key, value in slurm.items():
            if key in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or key not in os.environ:
                os.environ[key] = value
        source = "slurm"
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not (0 <= rank < world):
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world} (source: {source})")
    device = _pick_device(local_rank, device_pref)
    if world == 1 and not launcher_gave_master:
        return DistInfo(0, 1, local_rank, "none", device, source)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local_rank, backend, device, source)


def node_rank() -> int:
    """This process's node index as its launcher numbers nodes: Ray Train's node rank, torchrun's GROUP_RANK,
    NODE_RANK, Slurm's SLURM_NODEID; 0 when none says."""
    if "ray" in sys.modules:
        try:
            import ray.train

            return int(ray.train.get_context().get_node_rank())
        except Exception:  # not inside a Ray Train worker
            pass
    for name in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def write_rank_record(run_dir, info: DistInfo) -> None:
    """{run_dir}/ranks/rank{R}.json: the host this rank runs on and the rank variables it was given, to check the
    placement of a multi-node run (rewritten at every start, so a restarted run shows where it runs now)."""
    from .atomic import write_json_atomic

    folder = os.path.join(str(run_dir), "ranks")
    os.makedirs(folder, exist_ok=True)
    record = {"hostname": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "RANK": info.rank,
              "LOCAL_RANK": info.local_rank, "NODE_RANK": node_rank(), "WORLD_SIZE": info.world_size,
              "MASTER_ADDR": os.environ.get("MASTER_ADDR"), "MASTER_PORT": os.environ.get("MASTER_PORT"),
              "source": info.source, "backend": info.backend}
    write_json_atomic(os.path.join(folder, f"rank{info.rank}.json"), record)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process); returns the tensor."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a fixed-size tensor from every rank along dim 0, in rank order (one collective)."""
    if not is_dist():
        return tensor
    world = dist.get_world_size(group)
    out = torch.empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    return all_gather_into(out, tensor, group)


def all_gather_into(out: torch.Tensor, tensor: torch.Tensor, group=None) -> torch.Tensor:
    """`all_gather_cat` into a given `out` [world * rows, ...] (a fixed buffer, e.g. a CUDA graph's input)."""
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.1x
    gather_into(out, tensor.contiguous(), group=group)
    return out


def _running_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running means and variances of the plain BatchNorm layers (SyncBatchNorm's are global already)."""
    return [t for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
            and m.track_running_stats and m.running_mean is not None
            for t in (m.running_mean, m.running_var)]


def has_local_batchnorm(module: torch.nn.Module) -> bool:
    return bool(_running_stats(module))


def average_running_stats_(module: torch.nn.Module) -> None:
    """BatchNorm running statistics <- their mean over ranks, in place (one all-reduce; no-op on one process).
    Where SyncBatchNorm is not available (CPU) it keeps a model the same on every rank, as SyncBatchNorm would:
    the mean is the global batch mean's running average exactly, the variance the mean of the ranks' variances."""
    stats = _running_stats(module) if is_dist() else []
    if stats:
        flat = torch.cat([t.detach().float().reshape(-1) for t in stats])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        torch._foreach_copy_(stats, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in stats]), stats)])


def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Every buffer of `module` <- rank src's (no-op on one process): one model for a multi-rank evaluation."""
    if is_dist():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=src)


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(info: DistInfo) -> None:
    """End of a run: tear down the process group if `init_distributed` created it.

    All ranks first meet at a barrier. Otherwise a rank that is done early exits while rank 0 still
    writes its outputs, and gloo's teardown at interpreter exit can abort that rank (SIGABRT).
    A group made by someone else (Ray Train, a test) is left to its owner."""
    if info.source in ("initialised", "ray") or not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()


def add_counts(*counts: dict) -> dict:
    """Sum {name: count} dictionaries, leaving out zero counts."""
    total: dict = {}
    for part in counts:
        for name, n in part.items():
            if n:
                total[name] = total.get(name, 0) + int(n)
    return total


def sum_counts(counts: dict) -> dict:
    """Sum {name: int} dictionaries over ranks (outside the step: used for end-of-run reports)."""
    return add_counts(*gather_objects(dict(counts)))


def gather_objects(obj) -> list:
    """Every rank's small picklable object, in rank order (outside the step: end-of-run checks)."""
    if not is_dist():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (one small all-reduce; call on logging steps only)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def local_world_size() -> int:
    """Ranks sharing this machine: torchrun/local launcher's LOCAL_WORLD_SIZE, Slurm's tasks per node, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = os.environ.get(name, "")
        match = re.match(r"\d+", value)
        if match:
            return max(1, int(match.group(0)))
    return 1


def cpu_threads_per_rank() -> int:
    """Cores of this process's affinity split over the ranks on this machine: more threads than cores makes
    OpenMP spin against itself (measured here: 10x slower steps with 2 ranks x 2 threads on 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size())
