#!/usr/bin/env python
"""Semi-supervised gain on the demo data: supervised-only vs U2PL with the same step budget, both on CPU.

    python benchmarks/semi_gain.py                 # both runs, then a table of mIoU and the gain
    python benchmarks/semi_gain.py --full          # also the fully supervised reference (all train labels)
    python benchmarks/semi_gain.py --init scratch  # both from a random backbone instead
    python benchmarks/semi_gain.py --seeds 0,1,2,3 # every run once per seed: each seed's gain and the mean
Extra dotted overrides are applied to every run after the budget below (e.g. train.epochs=4).

The budget: configs/demo.yaml (the demo data: 16 labeled and 240 unlabeled train images; SGD, published U2PL
settings) with a lighter model (resnet10t, crop 48) and 1440 steps of 8 + 8 images. As in the published
settings, both runs start from a pretrained backbone: the demo backbone (u2pl_scale/data/demo_backbone.py,
pretrained on generated shape/texture classification images, the stand-in for ImageNet weights that cannot be
downloaded here; built on first use, about 2 minutes, then reused). From scratch, a CPU budget of minutes is
spent learning shape and texture at all, and the number of labels hardly matters (benchmarks/RESULTS.md).
The runs train side by side, each on its share of the CPU cores (--jobs 1: one after the other on all of them);
small CPU models use two single-thread processes better than one process with two threads, so the pair takes
about the U2PL run's time alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# as the user set it, before importing u2pl_scale sets its default (PASSIVE) in this process's environment
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
DEFAULT_BACKBONE = REPO / "shards" / "demo_backbone" / "resnet10t.safetensors"
# table rows, in display order
SUPERVISED, U2PL, FULL = ("supervised-only (1/16 labels)", "U2PL (1/16 labels + unlabeled)",
                          "supervised, all labels (reference)")
BUDGET = ["model.backbone=resnet10t", "data.crop_size=48", "train.epochs=12", "eval.interval_epochs=4"]


def backbone_build_env(user_policy: str | None) -> dict:
    """This process's environment for the backbone build, with OMP_WAIT_POLICY as the user set it (none: the CLI
    picks its faster policy), not the default that importing u2pl_scale put here."""
    env = dict(os.environ)
    if user_policy is None:
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = user_policy
    return env


def ensure_backbone(path: Path) -> None:
    """The default demo backbone is built when missing or from another version; another file must exist.
    Built by `shards/build.py demo-backbone` in its own process, which trains faster with spinning OpenMP workers
    than this process could (the package's default, sleeping workers, is read when torch loads)."""
    from u2pl_scale.data.demo_backbone import demo_backbone_ready

    if path == DEFAULT_BACKBONE.resolve():
        if not demo_backbone_ready(path):
            print(f"[semi_gain] pretraining the demo backbone -> {path} (once)", flush=True)
            build = subprocess.run([sys.executable, str(REPO / "shards" / "build.py"), "demo-backbone", "--out",
                                    str(path)], cwd=REPO, env=backbone_build_env(USER_OMP_WAIT_POLICY))
            if build.returncode != 0 or not demo_backbone_ready(path):
                raise SystemExit(f"[semi_gain] building the demo backbone failed (exit {build.returncode})")
            report = json.loads(path.with_name(path.name + ".json").read_text())
            print(f"[semi_gain] demo backbone: {report['seconds']:.0f} s, held-out shape / texture accuracy "
                  f"{report['held_out_shape_accuracy']:.3f} / {report['held_out_texture_accuracy']:.3f}",
                  flush=True)
    elif not path.is_file():
        raise SystemExit(f"[semi_gain] --backbone-file not found: {path}")


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
    summary["seed"] = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"]  # as the run resolved it
    return summary


def run_all(plan: dict, out_root: Path, jobs: int) -> dict:
    """Run the planned runs ({key: (run directory name, overrides)}), `jobs` at a time, each on cpu_count // jobs
    threads, in the plan's order; their summaries by key."""
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


def seed_list(text: str) -> list[int]:
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"need distinct integer seeds, e.g. 0,1,2,3; got {text!r}")
    return seeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "semi_gain"))
    parser.add_argument("--full", action="store_true", help="also train on all train labels (reference)")
    parser.add_argument("--init", choices=["pretrained", "scratch"], default="pretrained",
                        help="backbone start for both runs: the demo backbone (as the published settings start "
                             "from ImageNet weights; built on first use) or random")
    parser.add_argument("--backbone-file", default=str(DEFAULT_BACKBONE),
                        help="pretrained weights (.safetensors); the default file is built when missing")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time, each on cpu_count // jobs threads (default: 2 side by side)")
    parser.add_argument("--seeds", type=seed_list, default=None,
                        help="comma-separated seeds (0,1,2,3): train every run once per seed (train.seed) and report "
                             "each seed's gain and their mean; default: one run each with the config's seed")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    out = Path(args.out).resolve()
    started = time.time()
    os.chdir(REPO)  # the config's shard paths are relative to the checkout, as in the runs below
    sys.path.insert(0, str(REPO))
    from u2pl_scale.config import load_config
    from u2pl_scale.engine.trainer import ensure_demo_data

    ensure_demo_data(load_config(str(REPO / "configs" / "demo.yaml")))  # once, before runs that would race to it
    init = []
    if args.init == "pretrained":
        backbone = Path(args.backbone_file).resolve()
        ensure_backbone(backbone)
        init = ["model.pretrained=true", f"model.pretrained_path={backbone}"]
    # The longest runs first, so that with --jobs 2 the shorter ones fill the other slot.
    seeds = args.seeds or [None]  # None: the config's seed
    kinds = {U2PL: ("u2pl", ["method.name=u2pl"]), SUPERVISED: ("supervised", ["method.name=supervised"])}
    if args.full:
        kinds[FULL] = ("full", ["method.name=supervised", "data.labeled=shards/demo/full_labeled"])
    plan = {}
    for title, (name, kind) in kinds.items():
        for seed in seeds:
            plan[title, seed] = (name if seed is None else f"seed{seed}/{name}",
                                 [*init, *kind, *args.overrides, *([] if seed is None else [f"train.seed={seed}"])])
    t0 = time.time()
    runs = run_all(plan, out, args.jobs)
    titles = [title for title in (SUPERVISED, U2PL, FULL) if title in kinds]
    gains = [runs[U2PL, seed]["miou"] - runs[SUPERVISED, seed]["miou"] for seed in seeds]
    print("\n| run | seed | mIoU (%) | steps | wall (s) | eval |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed in seeds:
        for title in titles:
            s = runs[title, seed]
            print(f"| {title} | {s['seed']} | {100 * s['miou']:.2f} | {s['steps']} | "
                  f"{s['elapsed_s']:.0f} | {s['eval_mode']} |")
    timing = (f"training {time.time() - t0:.0f} s, {args.jobs} run(s) at a time; {time.time() - started:.0f} s in all")
    if len(seeds) == 1:
        print(f"\nU2PL gain over supervised-only: {100 * gains[0]:+.2f} mIoU ({timing})")
    else:
        per_seed = ", ".join(f"{seed}: {100 * g:+.2f}" for seed, g in zip(seeds, gains))
        print(f"\nU2PL gain over supervised-only by seed: {per_seed}")
        print(f"U2PL gain over supervised-only: mean {100 * statistics.mean(gains):+.2f} mIoU over {len(seeds)} "
              f"seeds, standard deviation {100 * statistics.stdev(gains):.2f} ({timing})")
    table = {title if seed is None else f"{title}, seed {seed}": {"miou": run["miou"], "steps": run["steps"],
                                                                  "seed": run["seed"], "elapsed_s": run["elapsed_s"]}
             for (title, seed), run in runs.items()}
    (out / "table.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
