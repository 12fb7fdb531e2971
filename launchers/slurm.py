#!/usr/bin/env python
"""Submit training to Slurm through submitit: one task per GPU (or --ntasks-per-node CPU tasks with --cpu).

    python launchers/slurm.py --nodes 4 --gpus-per-node 8 --config configs/voc_1464.yaml
    python launchers/slurm.py --nodes 1 --cpu --config configs/demo.yaml train.max_steps=20 --wait
    python launchers/slurm.py --follow 1234 --folder runs/slurm        # wait for a submitted job, print summary
    python launchers/slurm.py --nodes 2 --evaluate -- --checkpoint runs/voc --data shards/voc/val --flip

Every task runs `run_training(config, overrides + train.resume=auto)`; u2pl_scale.dist derives rank/world/master
from the Slurm task variables. Preemption or time-out: submitit calls TrainJob.checkpoint(), which requeues the same
job; after any requeue (also `scontrol requeue`) the tasks resume from the latest checkpoint in train.run_dir.
With --evaluate the tasks run launchers/evaluate.py's evaluation instead (its arguments after --), as ranks of one
group: each evaluates its share of the set and task 0 writes the report; a requeued evaluation starts over.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from u2pl_scale.entry import add_common_args  # noqa: E402  (light: no torch)


def _override_value(overrides: list[str], key: str):
    value = None
    for item in overrides:
        if item.split("=", 1)[0].strip() == key:
            value = item.split("=", 1)[1]
    return value


# how long a task that Slurm is stopping waits for its SIGKILL (Slurm's KillWait, 30 s by default) before it reports
# its error after all
STOPPING_GRACE_S = 120


def note_sigterm() -> threading.Event:
    """An event set when this process receives SIGTERM, which Slurm sends every task of a job it requeues or
    cancels (then SIGKILL after KillWait). The handler chains to the one installed before (submitit's)."""
    stopping = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        stopping.set()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    return stopping


def run_unless_stopped(function, stopping: threading.Event, grace_s: float = STOPPING_GRACE_S):
    """function(); but if it fails after Slurm began stopping the job (`stopping` set), wait up to `grace_s` for
    Slurm's SIGKILL instead of returning the error: with `scontrol requeue` a task whose peer was killed first fails
    in a collective, and submitit would record that as the job's result, which `--follow` then reports although the
    requeued job goes on and succeeds."""
    try:
        return function()
    except Exception:
        if not stopping.is_set():
            raise
        print("[slurm] this task failed while Slurm was stopping the job (requeue or cancel): waiting for Slurm to "
              "end it instead of recording the failure", file=sys.stderr, flush=True)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
        raise


class TrainJob:
    """The callable submitit pickles and runs in every task; checkpoint() makes preemption/time-out requeue it."""

    def __init__(self, config: str | None, overrides: list[str], repo: str = str(REPO)):
        self.config = config
        self.overrides = list(overrides)
        self.repo = repo

    def __call__(self) -> dict:
        if self.repo not in sys.path:
            sys.path.insert(0, self.repo)
        from u2pl_scale.config import load_config
        from u2pl_scale.entry import checkpoints_in, run_training

        overrides = list(self.overrides)
        run_dir = Path(load_config(self.config, overrides).train.run_dir)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        found = checkpoints_in(run_dir)
        # a requeued job (or a resubmission into the same run_dir) continues from its own latest checkpoint
        if found or _override_value(overrides, "train.resume") is None:
            overrides.append("train.resume=auto")
        if os.environ.get("SLURM_PROCID", "0") == "0":
            where = f"resuming from {found[-1]}" if found else "starting fresh"
            print(f"[slurm] job {os.environ.get('SLURM_JOB_ID')} (restart {restarts}): {where}; "
                  f"run dir {run_dir}", flush=True)
        return run_unless_stopped(lambda: run_training(self.config, overrides), note_sigterm())

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption/time-out (SIGUSR2): requeue the same job; the checkpoints written
        during training (train.checkpoint_interval, epoch ends) are what it resumes from."""
        import submitit

        print("[slurm] preempted or timed out: requeuing; the job resumes from its latest checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides, self.repo), *args, **kwargs)


class EvalJob:
    """The callable of an --evaluate job: launchers/evaluate.py's run on every task; task 0 returns the result."""

    def __init__(self, argv: list[str], repo: str = str(REPO)):
        self.argv = list(argv)
        self.repo = repo

    def __call__(self) -> dict | None:
        if self.repo not in sys.path:
            sys.path.insert(0, self.repo)
        from u2pl_scale.inference.evaluate_cli import run_evaluation

        def evaluate():
            code, result = run_evaluation(self.argv)
            if code:
                raise RuntimeError(f"evaluation failed with exit code {code} (see the task's .err log)")
            return result

        return run_unless_stopped(evaluate, note_sigterm())

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(EvalJob(self.argv, self.repo), *args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_config=str(REPO / "configs" / "demo.yaml"), evaluate=True)
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (sbatch --nodes)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; one task (rank) per GPU")
    p.add_argument("--cpu", action="store_true", help="CPU-only run: gloo, --ntasks-per-node tasks per node")
    p.add_argument("--ntasks-per-node", type=int, default=2, help="tasks per node with --cpu (default: 2)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPU cores per task (default: 8 with GPUs, 1 with --cpu)")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default: 1440)")
    p.add_argument("--account", default=None, help="Slurm account to charge")
    p.add_argument("--qos", default=None, help="Slurm QOS")
    p.add_argument("--constraint", default=None, help="node features, e.g. a100")
    p.add_argument("--mem", default=None, help="memory per node: GB as a number (64) or Slurm syntax (64G, 0 = all)")
    p.add_argument("--folder", default="runs/slurm/%j", help="submitit folder for logs and pickles "
                   "(%%j = job id; default: %(default)s)")
    p.add_argument("--job-name", default="u2pl", help="Slurm job name")
    p.add_argument("--wait", action="store_true", help="follow the job to the end and print its summary")
    p.add_argument("--follow", metavar="JOB_ID", default=None, help="do not submit: wait for this job "
                   "(submitted with the same --folder) and print its summary")
    return p


def executor_parameters(args: argparse.Namespace) -> dict:
    """submitit AutoExecutor parameters for the parsed flags."""
    tasks = args.ntasks_per_node if args.cpu else args.gpus_per_node
    if tasks < 1:
        raise SystemExit("error: need at least one task per node (--gpus-per-node / --ntasks-per-node)")
    params: dict = {
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task or (1 if args.cpu else 8),
        "timeout_min": args.time,
        "name": args.job_name,
    }
    if not args.cpu:
        params["gpus_per_node"] = args.gpus_per_node
    for flag, key in (("partition", "slurm_partition"), ("account", "slurm_account"), ("qos", "slurm_qos"),
                      ("constraint", "slurm_constraint")):
        if getattr(args, flag):
            params[key] = getattr(args, flag)
    if args.mem is not None:
        if str(args.mem).replace(".", "", 1).isdigit() and float(args.mem) > 0:
            params["mem_gb"] = float(args.mem) if "." in str(args.mem) else int(args.mem)
        else:
            params["slurm_mem"] = str(args.mem)
    return params


def job_overrides(args: argparse.Namespace) -> tuple[list[str], Path]:
    """Pass-through overrides plus what the launcher decides: device, threads, an absolute run dir."""
    from u2pl_scale.config import load_config

    overrides = list(args.overrides)
    if args.cpu and _override_value(overrides, "train.device") is None:
        overrides.append("train.device=cpu")
    if args.cpu and _override_value(overrides, "train.num_threads") is None:
        overrides.append(f"train.num_threads={args.cpus_per_task or 1}")  # no oversubscription on shared cores
    cfg = load_config(args.config, overrides)  # validate before queueing: a bad key fails here, not in the job
    run_dir = Path(cfg.train.run_dir).resolve()
    overrides.append(f"train.run_dir={run_dir}")
    return overrides, run_dir


def follow(job, run_dir: Path | None) -> int:
    print(f"[slurm] waiting for job {job.job_id} ...", flush=True)
    try:
        results = job.results()
    except Exception as e:  # submitit raises the job's own error with its log tail
        print(f"[slurm] job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    summary = results[0] if results else None
    if summary is None and run_dir is not None and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    print(f"[slurm] job {job.job_id} finished; result:")
    print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from u2pl_scale.config import ConfigError

    overrides: list[str] = []
    run_dir = None
    if args.evaluate and not args.follow:
        from u2pl_scale.inference.evaluate_cli import absolute_argv
        overrides = absolute_argv(args.overrides, cpu=args.cpu)  # bad arguments stop here, not in the job
    elif not args.follow:
        try:
            overrides, run_dir = job_overrides(args)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if shutil.which("sbatch") is None:
        print("error: Slurm's sbatch is not on PATH. Run this on a Slurm login node, or start the local test "
              "cluster with `sudo tests/cluster/slurm_local.sh start`.", file=sys.stderr)
        return 2
    import submitit

    folder = Path(args.folder)
    folder = (folder if folder.is_absolute() else Path.cwd() / folder)
    if args.follow:
        job = submitit.SlurmJob(folder=str(folder), job_id=str(args.follow))
        return follow(job, None)
    config = str(Path(args.config).resolve()) if args.config else None
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    executor.update_parameters(**executor_parameters(args))
    job = executor.submit(EvalJob(overrides) if args.evaluate else TrainJob(config, overrides))
    log_dir = Path(str(folder).replace("%j", str(job.job_id)))
    ntasks = executor_parameters(args)["tasks_per_node"] * args.nodes
    print(f"[slurm] submitted job {job.job_id}: {args.nodes} node(s) x "
          f"{executor_parameters(args)['tasks_per_node']} task(s) = {ntasks} rank(s)", flush=True)
    print(f"[slurm] logs: {log_dir}/{job.job_id}_<task>_log.out and .err (task 0: "
          f"{log_dir}/{job.job_id}_0_log.out)", flush=True)
    if run_dir is not None:
        print(f"[slurm] run dir (checkpoints, summary.json): {run_dir}", flush=True)
    if not args.wait:
        print(f"[slurm] follow it with: squeue -j {job.job_id}; tail -f {log_dir}/{job.job_id}_0_log.out", flush=True)
        return 0
    return follow(job, run_dir)


if __name__ == "__main__":
    sys.exit(main())
