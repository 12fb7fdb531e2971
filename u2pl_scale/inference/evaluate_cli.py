"""The evaluation run behind launchers/evaluate.py, also started by launchers/slurm.py and launchers/ray_train.py
(`--evaluate -- <these arguments>`): every rank reads its share of the set, the confusion matrix is reduced once,
rank 0 writes the report. The rank comes from wherever training takes it (u2pl_scale.dist)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

DESCRIPTION = """Evaluate a trained checkpoint on a labeled shard set: mIoU, per-class IoU, pixel accuracy, a
confusion-matrix PNG and a JSON report (every figure recorded with its mode and scales)."""


def build_parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(**kwargs)
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
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(prog="evaluate", description=DESCRIPTION).parse_args(argv)


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:")


def absolute_argv(argv: list[str], cpu: bool = False) -> list[str]:
    """`argv` with --checkpoint/--data/--out made absolute (cluster tasks do not start in the launch directory)
    and `--device cpu` added for CPU-only tasks unless a device is given. Raises SystemExit on bad arguments and
    on a checkpoint that does not exist, before anything is submitted."""
    args = parse(argv)
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"error: --checkpoint {args.checkpoint} does not exist")
    out: list[str] = []
    flags = ("--checkpoint", "--data", "--out")
    i = 0
    while i < len(argv):
        item = argv[i]
        name, eq, value = item.partition("=")
        if name in flags and eq and _is_local(value):
            out.append(f"{name}={os.path.abspath(value)}")
        elif item in flags and i + 1 < len(argv):
            value = argv[i + 1]
            out += [item, os.path.abspath(value) if _is_local(value) else value]
            i += 1
        else:
            out.append(item)
        i += 1
    if cpu and not any(a == "--device" or a.startswith("--device=") for a in argv):
        out += ["--device", "cpu"]
    return out


def run_evaluation(argv: list[str]) -> tuple[int, Optional[dict]]:
    """Evaluate on this rank (one process, or a member of torchrun / Slurm / Ray ranks). Returns the exit code and,
    on rank 0, a short result: mIoU, pixel accuracy, per-class IoU, the setting and the report's path."""
    args = parse(argv)
    import torch

    from .. import dist
    from .checkpoint import CheckpointError, load_checkpoint
    from .evaluation import class_names_for, confusion_over_set, data_config, format_report, report, write_outputs
    from .predictor import Predictor, parse_scales

    info = dist.init_distributed(args.device)
    try:
        try:
            loaded = load_checkpoint(args.checkpoint)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2, None
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
        if info.rank != 0:
            return 0, None
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
        short = {k: rep[k] for k in ("miou", "pixel_accuracy", "per_class_iou", "eval_mode", "scales", "flip",
                                     "images", "bad_samples", "world_size", "model", "checkpoint", "data")}
        return 0, dict(short, report=str(js))
    finally:
        dist.finish(info)
