#!/usr/bin/env python
"""Semi-supervised gain on the demo data: supervised-only vs U2PL with the same step budget, both on CPU.

    python benchmarks/semi_gain.py                 # both runs, then a table of mIoU and the gain
    python benchmarks/semi_gain.py --full          # also the fully supervised reference (all train labels)
Extra dotted overrides are applied to every run after the budget below (e.g. train.epochs=4).

The budget: configs/demo.yaml (the demo data, SGD, published U2PL settings) with a lighter model and more steps
than the demo run, so that the supervised model has time to fit its 64 labeled images and the number of labels,
not the number of steps, limits it (at 600 steps, about the demo run's length, all 1024 labels do no better
than 64: benchmarks/RESULTS.md). The runs train side by side, each on its share of the CPU cores (--jobs 1: one
after the other on all of them); small CPU models use two single-thread processes better than one process with
two threads, so the pair takes about the U2PL run's time alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET = ["model.backbone=resnet10t", "data.crop_size=48", "train.epochs=16", "eval.interval_epochs=4"]


def start(name: str, out_root: Path, threads: int, overrides: list[str]) -> tuple[subprocess.Popen, Path, float]:
    run_dir = out_root / name
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           f"train.run_dir={run_dir}", "train.progress_bar=false", *BUDGET, f"train.num_threads={threads}",
           *overrides]
    print(f"[semi_gain] {name}: {' '.join(cmd[2:])}", flush=True)
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL), run_dir, time.time()


def finish(name: str, proc: subprocess.Popen, run_dir: Path, t0: float) -> dict:
    if proc.wait() != 0:
        raise SystemExit(f"[semi_gain] the {name} run failed (exit {proc.returncode}); see {run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["elapsed_s"] = time.time() - t0
    return summary


def run_all(plan: dict[str, tuple[str, list[str]]], out_root: Path, jobs: int) -> dict[str, dict]:
    """Run the planned runs, `jobs` at a time, each on cpu_count // jobs threads; summaries by display name."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results, pending, running = {}, list(plan.items()), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                title, (name, overrides) = pending.pop(0)
                running.append((title, name, *start(name, out_root, threads, overrides)))
            done = [entry for entry in running if entry[2].poll() is not None]
            for entry in done:
                running.remove(entry)
                title, *rest = entry
                results[title] = finish(*rest)
            if not done:
                time.sleep(1)
    finally:  # a failed run stops the benchmark: do not leave the others training in the background
        for _, _, proc, _, _ in running:
            proc.kill()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "semi_gain"))
    parser.add_argument("--full", action="store_true", help="also train on all train labels (reference)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time, each on cpu_count // jobs threads (default: 2 side by side)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    out = Path(args.out).resolve()
    os.chdir(REPO)  # the config's shard paths are relative to the checkout, as in the runs below
    sys.path.insert(0, str(REPO))
    from u2pl_scale.config import load_config
    from u2pl_scale.engine.trainer import ensure_demo_data

    ensure_demo_data(load_config(str(REPO / "configs" / "demo.yaml")))  # once, before runs that would race to it
    # The longest run first, so that with --jobs 2 the shorter ones fill the other slot.
    plan = {"U2PL (1/16 labels + unlabeled)": ("u2pl", ["method.name=u2pl", *args.overrides]),
            "supervised-only (1/16 labels)": ("supervised", ["method.name=supervised", *args.overrides])}
    if args.full:
        plan["supervised, all labels (reference)"] = (
            "full", ["method.name=supervised", "data.labeled=shards/demo/full_labeled", *args.overrides])
    t0 = time.time()
    runs = run_all(plan, out, args.jobs)
    order = ["supervised-only (1/16 labels)", "U2PL (1/16 labels + unlabeled)", "supervised, all labels (reference)"]
    runs = {title: runs[title] for title in order if title in runs}
    sup = runs["supervised-only (1/16 labels)"]["miou"]
    semi = runs["U2PL (1/16 labels + unlabeled)"]["miou"]
    print("\n| run | mIoU (%) | steps | wall (s) | eval |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in runs.items():
        print(f"| {name} | {100 * s['miou']:.2f} | {s['steps']} | {s['elapsed_s']:.0f} | {s['eval_mode']} |")
    print(f"\nU2PL gain over supervised-only: {100 * (semi - sup):+.2f} mIoU "
          f"({time.time() - t0:.0f} s in all, {args.jobs} run(s) at a time)")
    (out / "table.json").write_text(json.dumps({k: {"miou": v["miou"], "steps": v["steps"],
                                                    "elapsed_s": v["elapsed_s"]} for k, v in runs.items()},
                                               indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
