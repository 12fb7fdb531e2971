#!/usr/bin/env python
"""Semi-supervised gain on the demo data: supervised-only vs U2PL with the same step budget, both on CPU.

    python benchmarks/semi_gain.py                 # both runs, then a table of mIoU and the gain
    python benchmarks/semi_gain.py --full          # also the fully supervised reference (all train labels)
Extra dotted overrides are applied to every run after the budget below (e.g. train.epochs=4).

The budget: configs/demo.yaml (the demo data, SGD, published U2PL settings) with a lighter model and more steps
than the demo run, so that the supervised model has time to fit its 64 labeled images and the number of labels,
not the number of steps, limits it (at 600 steps, about the demo run's length, all 1024 labels do no better
than 64: benchmarks/RESULTS.md). Both runs train at 2 CPU threads, one after the other.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET = ["model.backbone=resnet10t", "data.crop_size=48", "train.epochs=16", "eval.interval_epochs=4",
          "train.num_threads=2"]


def run(name: str, out_root: Path, overrides: list[str]) -> dict:
    run_dir = out_root / name
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           f"train.run_dir={run_dir}", "train.progress_bar=false", *BUDGET, *overrides]
    t0 = time.time()
    print(f"[semi_gain] {name}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["elapsed_s"] = time.time() - t0
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "semi_gain"))
    parser.add_argument("--full", action="store_true", help="also train on all train labels (reference)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    runs = {
        "supervised-only (1/16 labels)": run("supervised", out, ["method.name=supervised", *args.overrides]),
        "U2PL (1/16 labels + unlabeled)": run("u2pl", out, ["method.name=u2pl", *args.overrides]),
    }
    if args.full:
        runs["supervised, all labels (reference)"] = run(
            "full", out, ["method.name=supervised", "data.labeled=shards/demo/full_labeled", *args.overrides])
    sup = runs["supervised-only (1/16 labels)"]["miou"]
    semi = runs["U2PL (1/16 labels + unlabeled)"]["miou"]
    print("\n| run | mIoU (%) | steps | wall (s) | eval |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in runs.items():
        print(f"| {name} | {100 * s['miou']:.2f} | {s['steps']} | {s['elapsed_s']:.0f} | {s['eval_mode']} |")
    print(f"\nU2PL gain over supervised-only: {100 * (semi - sup):+.2f} mIoU")
    (out / "table.json").write_text(json.dumps({k: {"miou": v["miou"], "steps": v["steps"],
                                                    "elapsed_s": v["elapsed_s"]} for k, v in runs.items()},
                                               indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
