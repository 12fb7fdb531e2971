#!/usr/bin/env python
"""Train with Ray Train: TorchTrainer workers run the same training function; checkpoints go through Ray.

    python launchers/ray_train.py --num-workers 2 --config configs/demo.yaml train.max_steps=20      # local Ray, CPU
    python launchers/ray_train.py --address auto --num-workers 16 --gpu --config configs/voc_1464.yaml \
        --storage-path /shared/ray_results --name voc1464
    python launchers/ray_train.py --num-workers 4 --evaluate -- --checkpoint runs/demo --data shards/demo/val

Every worker reports at every checkpoint the trainer writes (rank 0 attaches the checkpoint, the others None, so
all workers report equally often) and after every log interval; after a worker failure Ray restarts the group
(--max-failures) and the workers resume from ray.train.get_checkpoint(). With --evaluate the workers run
launchers/evaluate.py's evaluation instead (its arguments after --), each on its share of the set; worker 0 writes
the report and reports the result as the run's final metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from u2pl_scale.entry import add_common_args  # noqa: E402  (light: no torch)

def _scalars(metrics: dict) -> dict:
    """What Ray keeps as metrics: numbers, strings, booleans (lists/pictures stay in run_dir)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _make_hooks():
    from u2pl_scale.entry import TrainHooks

    class RayReportHooks(TrainHooks):
        """Reports to Ray Train from every worker at the same points of the run."""

        def __init__(self):
            import ray.train

            self.train = ray.train
            self.rank = ray.train.get_context().get_world_rank()

        def on_log(self, step: int, metrics: dict) -> None:
            self.train.report(_scalars(dict(metrics, step=step)))

        def on_checkpoint(self, step: int, ckpt_dir: str, metrics: dict) -> None:
            from ray.train import Checkpoint

            checkpoint = Checkpoint.from_directory(ckpt_dir) if self.rank == 0 else None
            self.train.report(_scalars(dict(metrics, step=step)), checkpoint=checkpoint)

    return RayReportHooks()


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs in every Ray Train worker; the gloo/NCCL group is already set up by TorchTrainer."""
    if loop_config["repo"] not in sys.path:
        sys.path.insert(0, loop_config["repo"])
    import ray.train

    from u2pl_scale.entry import run_training

    overrides = list(loop_config["overrides"])
    hooks = _make_hooks()
    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        summary = run_training(loop_config["config"], overrides, hooks)
    else:
        with checkpoint.as_directory() as ckpt_dir:
            if rank == 0:
                print(f"[ray] resuming from reported checkpoint {ckpt_dir}", flush=True)
            summary = run_training(loop_config["config"], overrides + [f"train.resume={ckpt_dir}"], hooks)
    # the final metrics of the run (every worker reports once more, so the counts stay equal)
    ray.train.report(_scalars(dict(summary, final=True)))


def eval_loop_per_worker(loop_config: dict) -> None:
    """An --evaluate run in every Ray Train worker: the evaluation joins TorchTrainer's process group."""
    if loop_config["repo"] not in sys.path:
        sys.path.insert(0, loop_config["repo"])
    import ray.train

    from u2pl_scale.inference.evaluate_cli import run_evaluation

    code, result = run_evaluation(loop_config["argv"])
    if code:
        raise RuntimeError(f"evaluation failed with exit code {code}")
    if result is None:  # every worker reports once; only worker 0's report carries the result
        ray.train.report({"final": True})
        return
    import shutil
    import tempfile

    from ray.train import Checkpoint

    # the report files travel as the run's checkpoint, so they reach --storage-path (and the driver) from any node
    with tempfile.TemporaryDirectory() as folder:
        report_dir = Path(result["report"]).parent
        for name in ("report.json", "confusion.png"):
            if (report_dir / name).is_file():
                shutil.copy2(report_dir / name, Path(folder) / name)
        ray.train.report(_scalars(dict(result, final=True)), checkpoint=Checkpoint.from_directory(folder))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_config=str(REPO / "configs" / "demo.yaml"), evaluate=True)
    p.add_argument("--num-workers", type=int, default=2, help="training workers (ranks), default 2")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default: CPU workers (gloo)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPU cores reserved per worker (default 1)")
    p.add_argument("--address", default=None, help="existing Ray cluster (host:port, ray://host:10001 or auto); "
                   "default: start a local Ray for this run")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: what workers need)")
    p.add_argument("--storage-path", default="runs/ray", help="Ray results and checkpoints; shared storage "
                   "(NFS or s3://...) on multi-node clusters (default: %(default)s)")
    p.add_argument("--name", default=None, help="run name under --storage-path (default: u2pl, or u2pl_eval "
                   "with --evaluate)")
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts after failures (default 1)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="reported checkpoints Ray keeps (default 2)")
    return p


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the address, when nothing listens there (ray.init would wait a long time)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"error: --address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise SystemExit(f"error: cannot reach a Ray cluster at --address {address} ({e}). Is `ray start --head` "
                         f"running there, and is the port open from this machine?") from None


def absolute_data_paths(data) -> list[str]:
    """Overrides that make relative local shard paths absolute: Ray workers do not run in the launch directory."""
    def absolute(path):
        if isinstance(path, list):
            return [absolute(p) for p in path]
        if isinstance(path, str) and "://" not in path and not path.startswith("pipe:") and not os.path.isabs(path):
            return os.path.abspath(path)
        return path

    out = []
    for key in ("labeled", "unlabeled", "val"):
        value = getattr(data, key)
        if absolute(value) != value:
            out.append(f"data.{key}={json.dumps(absolute(value))}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.name = args.name or ("u2pl_eval" if args.evaluate else "u2pl")
    from u2pl_scale.config import ConfigError, load_config

    storage = args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())
    if args.evaluate:
        from u2pl_scale.inference.evaluate_cli import absolute_argv
        loop, loop_config = eval_loop_per_worker, {"argv": absolute_argv(args.overrides, cpu=not args.gpu),
                                                    "repo": str(REPO)}
        return fit(args, storage, loop, loop_config)
    overrides = list(args.overrides)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if "train.device" not in given:
        overrides.append(f"train.device={'cuda' if args.gpu else 'cpu'}")
    if not args.gpu and "train.num_threads" not in given:
        overrides.append(f"train.num_threads={args.cpus_per_worker}")
    if "train.run_dir" not in given:
        # the trainer's own files (logs, pictures, local checkpoints): shared storage for multi-node runs
        if "://" in storage:
            raise SystemExit("error: with a remote --storage-path give train.run_dir=<shared directory> too")
        overrides.append(f"train.run_dir={Path(storage) / args.name / 'run'}")
    config = str(Path(args.config).resolve()) if args.config else None
    try:
        cfg = load_config(config, overrides)  # fail here, before starting workers, on a bad key or value
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides += absolute_data_paths(cfg.data)
    return fit(args, storage, train_loop_per_worker, {"config": config, "overrides": overrides, "repo": str(REPO)})


def fit(args: argparse.Namespace, storage: str, loop, loop_config: dict) -> int:
    """Start or join Ray, run `loop` on the workers, print where the results went."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if args.address:
        check_reachable(args.address)
        try:
            ray.init(address=args.address)
        except Exception as e:  # ConnectionError and friends: say which address
            raise SystemExit(f"error: cannot connect to the Ray cluster at --address {args.address}: {e}") from None
    else:
        ray.init(address="local", num_cpus=args.num_cpus or args.num_workers * args.cpus_per_worker,
                 include_dashboard=False)
    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1} if args.gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage, name=args.name,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=args.keep_checkpoints or None)),
    )
    try:
        result = trainer.fit()
    finally:
        ray.shutdown()
    if result.error:
        print(f"[ray] {'evaluation' if args.evaluate else 'training'} failed: {result.error}", file=sys.stderr)
        return 1
    print(f"[ray] finished: results in {result.path}; {'report files' if args.evaluate else 'latest checkpoint'}: "
          f"{result.checkpoint.path if result.checkpoint else None}")
    print("[ray] final metrics: " + json.dumps(result.metrics, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
