#!/usr/bin/env python
"""Evaluate a trained checkpoint on a labeled shard set: mIoU, per-class IoU, pixel accuracy, a confusion-matrix
PNG and a JSON report (every figure recorded with its mode and scales).

    python launchers/evaluate.py --checkpoint runs/demo --data shards/demo/val
    python launchers/evaluate.py --checkpoint runs/demo/best.pt --data shards/demo/val --mode sliding --crop 64 \
        --scales 0.75,1,1.25 --flip --nproc 2 --out runs/demo/eval_ms
    python launchers/slurm.py --nodes 2 --gpus-per-node 8 --evaluate -- --checkpoint runs/voc --data shards/voc/val
    python launchers/ray_train.py --num-workers 4 --evaluate -- --checkpoint runs/demo --data shards/demo/val
--checkpoint takes a run directory (its best.pt), best.pt or a checkpoint's state.pt. The defaults (mode, crop,
precision, batch size) are the run's own evaluation settings, so the same mode reproduces the trainer's figure.
--nproc N runs N gloo ranks (each reads its share of the set; one reduction of the confusion matrix); torchrun,
Slurm and Ray ranks work the same way.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import u2pl_scale  # noqa: E402,F401  (CPU threading environment before torch loads)
from u2pl_scale.inference.evaluate_cli import build_parser, run_evaluation  # noqa: E402


def parse_args(argv=None):
    return build_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.nproc > 1 and "RANK" not in os.environ:
        from u2pl_scale.local_ranks import spawn
        return spawn(str(Path(__file__).resolve()), args.nproc, argv)
    return run_evaluation(argv)[0]


if __name__ == "__main__":
    sys.exit(main())
