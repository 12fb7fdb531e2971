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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from u2pl_scale.entry import add_common_args, run_training  # noqa: E402
from u2pl_scale.local_ranks import spawn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_config=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--nproc", type=int, default=1, help="number of local processes (ranks)")
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nproc > 1 and "RANK" not in os.environ:
        forwarded = ["--nproc", "1", "--config", args.config, *args.overrides]
        return spawn(str(Path(__file__).resolve()), args.nproc, forwarded)
    summary = run_training(args.config, args.overrides)
    if summary.get("miou") is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"final teacher mIoU: {100 * summary['miou']:.2f}" if summary.get("evaluated_model") == "teacher"
              else f"final {summary.get('evaluated_model')} mIoU: {100 * summary['miou']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
