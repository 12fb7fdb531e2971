#!/usr/bin/env python
"""Run training on this machine: one process, or `--nproc N` processes like torchrun (gloo on CPU, NCCL on GPUs).

    python launchers/local.py                                  # the demo (builds demo shards when missing)
    python launchers/local.py --config configs/voc_1464.yaml train.epochs=3
    python launchers/local.py --nproc 2 train.max_steps=20
Also works under plain torchrun: `torchrun --nproc_per_node 2 launchers/local.py ...`.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from u2pl_scale.entry import add_common_args, run_training  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(nproc: int, argv: list[str]) -> int:
    """Start nproc copies of this script as ranks 0..nproc-1; stop all if one fails; return the exit code."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--nproc", "1", *argv],
                                      env=env))
    code = 0
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0 and code == 0:
                    code = rc
                    print(f"[local] a rank exited with code {rc}; stopping the others", file=sys.stderr)
                    for other in procs:
                        other.send_signal(signal.SIGTERM)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        code = 130
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_config=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--nproc", type=int, default=1, help="number of local processes (ranks)")
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nproc > 1 and "RANK" not in os.environ:
        forwarded = ["--config", args.config, *args.overrides]
        return spawn(args.nproc, forwarded)
    summary = run_training(args.config, args.overrides)
    if summary.get("miou") is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"final teacher mIoU: {100 * summary['miou']:.2f}" if summary.get("evaluated_model") == "teacher"
              else f"final {summary.get('evaluated_model')} mIoU: {100 * summary['miou']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
