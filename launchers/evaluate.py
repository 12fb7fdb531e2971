#!/usr/bin/env python
"""Evaluate a trained checkpoint on a labeled shard set: mIoU, per-class IoU, pixel accuracy, a confusion-matrix
PNG and a JSON report (every figure recorded with its mode and scales).

    python launchers/evaluate.py --checkpoint runs/demo --data shards/demo/val
    python launchers/evaluate.py --checkpoint runs/demo/best.pt --data shards/demo/val --mode sliding --crop 64 \
        --scales 0.75,1,1.25 --flip --nproc 2 --out runs/demo/eval_ms
--checkpoint takes a run directory (its best.pt), best.pt or a checkpoint's state.pt. The defaults (mode, crop,
precision, batch size) are the run's own evaluation settings, so the same mode reproduces the trainer's figure.
--nproc N runs N gloo ranks (each reads its share of the set; one reduction of the confusion matrix).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import u2pl_scale  # noqa: E402,F401  (CPU threading environment before torch loads)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, best.pt or state.pt")
    p.add_argument("--data", default=None,
                   help="labeled shard set (directory, manifest or URL); default: the run's data.val")
    p.add_argument("--mode", choices=["whole", "sliding", "center"], default=None,
                   help="default: the run's eval.mode")
    p.add_argument("--crop", type=int, default=None, help="window / centre crop size (default: eval.crop_size)")
    p.add_argument("--stride-rate", type=float, default=None, help="sliding stride / crop (default: the run's)")
    p.add_argument("--scales", default="1", help="comma-separated test scales, e.g. 0.75,1,1.25")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    p.add_argument("--nproc", type=int, default=1, help="local ranks (gloo on CPU, NCCL on GPUs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: the run's precision where this device runs it natively")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default: data.batch_size_val)")
    p.add_argument("--num-workers", type=int, default=None, help="decoding workers per rank (default: the run's)")
    p.add_argument("--out", default=None, help="report directory (default: <run dir>/eval_<mode>)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.nproc > 1 and "RANK" not in os.environ:
        from u2pl_scale.local_ranks import spawn
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        return spawn(str(Path(__file__).resolve()), args.nproc, forwarded)

    import torch

    from u2pl_scale import dist
    from u2pl_scale.inference.checkpoint import CheckpointError, load_checkpoint
    from u2pl_scale.inference.evaluation import (class_names_for, confusion_over_set, data_config, format_report, report,
                                                 write_outputs)
    from u2pl_scale.inference.predictor import Predictor, parse_scales

    info = dist.init_distributed(args.device)
    try:
        try:
            loaded = load_checkpoint(args.checkpoint)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if info.device.type == "cpu":
            torch.set_num_threads(dist.cpu_threads_per_rank())
        eval_meta = loaded.meta.get("eval") or {}
        mode = args.mode or eval_meta.get("mode", "whole")
        predictor = Predictor(loaded.model, loaded.meta, mode=mode, crop=args.crop, stride_rate=args.stride_rate,
                              scales=parse_scales(args.scales), flip=args.flip, device=info.device,
                              precision=args.precision)
        data_cfg = data_config(loaded, args.data, args.num_workers)
        batch = args.batch or data_cfg.batch_size_val
        conf, images, bad = confusion_over_set(predictor, data_cfg, info.rank, info.world_size, batch)
        if info.rank == 0:
            rep = report(conf, class_names_for(loaded, data_cfg.val), predictor.describe(), {
                "checkpoint": str(loaded.path), "data": str(data_cfg.val), "images": images,
                "bad_samples": bad, "world_size": info.world_size, "model": loaded.meta["evaluated_model"],
                "checkpoint_step": loaded.meta.get("step")})
            run_dir = loaded.path.parent
            if loaded.path.name == "state.pt" and run_dir.parent.name == "checkpoints":  # beside the run, not
                run_dir = run_dir.parent.parent  # inside a checkpoint that rotation will delete
            out = Path(args.out) if args.out else run_dir / f"eval_{mode}"
            js, png = write_outputs(out, rep)
            print(format_report(rep))
            print(f"{images} images{f', skipped {bad}' if bad else ''}; report: {js}; confusion matrix: {png}")
    finally:
        dist.finish(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
