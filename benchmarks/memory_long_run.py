"""Resident memory over a long training run (issue 25 item 5): does any process grow after warm-up?

Trains the demo (U2PL, one rank, its data-loading workers) for --steps steps and samples, at every log step, the
resident set size (VmRSS) of the training process and of each of its child processes (the DataLoader workers),
read from /proc. Prints the samples at about a dozen evenly spaced steps, then per process the growth over the
post-warm-up part of the run (the first --warmup-fraction of the steps excluded: allocator pools, the queues filling,
the first evaluation): min, max, last minus first, and the least-squares slope in MB per 1000 steps.

    python benchmarks/memory_long_run.py                         # 3000 steps of the demo (U2PL after epoch 1)
    python benchmarks/memory_long_run.py --steps 500 -- train.log_interval=10 data.num_workers=1
    python benchmarks/memory_long_run.py --json out.json         # the samples too

Extra dotted overrides (after --) go to the run; the defaults are the demo config with the semi_gain demo budget
(resnet10t, crop 48), epochs of 50 steps and checkpoints every 500 steps (checkpoint writes are part of a long run). Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from u2pl_scale.engine.hooks import TrainHooks  # noqa: E402
from u2pl_scale.entry import run_training  # noqa: E402


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


class RssSampler(TrainHooks):
    """At every log step: the trainer's RSS and its workers' (summed; workers are recreated every epoch)."""

    def __init__(self):
        self.samples: list[dict] = []
        self.t0 = time.time()

    def on_log(self, step: int, metrics: dict) -> None:
        workers = [r for r in (rss_mb(c) for c in children(os.getpid())) if r is not None]
        self.samples.append({"step": step, "s": round(time.time() - self.t0, 1), "main_mb": rss_mb(os.getpid()),
                             "workers_mb": sum(workers), "workers": len(workers)})


def growth(samples: list[dict], key: str, warmup_fraction: float) -> dict:
    last_step = samples[-1]["step"]
    tail = [s for s in samples if s["step"] > warmup_fraction * last_step and s["workers"] > 0]
    tail = tail or samples
    xs, ys = [s["step"] for s in tail], [s[key] for s in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return {"from_step": xs[0], "min": min(ys), "max": max(ys), "last_minus_first": ys[-1] - ys[0],
            "slope_mb_per_1000_steps": 1000 * slope}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = ["model.backbone=resnet10t", "data.crop_size=48", "train.progress_bar=false",
                     f"train.max_steps={args.steps}", "data.steps_per_epoch=50",
                     f"train.epochs={max(2, -(-args.steps // 50))}",
                     "train.checkpoint_interval=500", "eval.interval_epochs=10", "eval.num_pictures=0",
                     f"train.run_dir={run_dir}", *args.overrides]
        sampler = RssSampler()
        summary = run_training(args.config, overrides, hooks=sampler)
    samples = sampler.samples
    print(f"\n{summary['steps']} steps, {summary['wall_s']:.0f} s, mIoU {100 * (summary['miou'] or 0):.2f}")
    print("| step | s | trainer RSS MB | workers RSS MB (n) |\n| --- | --- | --- | --- |")
    stride = max(1, len(samples) // 12)
    for s in samples[::stride] + ([samples[-1]] if (len(samples) - 1) % stride else []):
        print(f"| {s['step']} | {s['s']} | {s['main_mb']:.1f} | {s['workers_mb']:.1f} ({s['workers']}) |")
    result = {key: growth(samples, key, args.warmup_fraction) for key in ("main_mb", "workers_mb")}
    print("\n| process | from step | min MB | max MB | last - first MB | slope MB / 1000 steps |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, g in result.items():
        print(f"| {'trainer' if key == 'main_mb' else 'workers'} | {g['from_step']} | {g['min']:.1f} | "
              f"{g['max']:.1f} | {g['last_minus_first']:+.1f} | {g['slope_mb_per_1000_steps']:+.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary_steps": summary["steps"], "growth": result,
                                               "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
