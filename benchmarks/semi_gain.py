#!/usr/bin/env python
"""Semi-supervised gain: supervised-only vs U2PL with the same budget, on the demo data (default) or any dataset.

    python benchmarks/semi_gain.py                 # the demo: both runs, then a table of mIoU and the gain
    python benchmarks/semi_gain.py --full          # also the fully supervised reference (all train labels)
    python benchmarks/semi_gain.py --init scratch  # both from a random backbone instead
    python benchmarks/semi_gain.py --seeds 0,1,2,3 # every run once per seed: each seed's gain, mean, min, stdev
    python benchmarks/semi_gain.py --config configs/msrc21.yaml --test shards/msrc21/test --seeds 0,1,2 \\
        --full shards/msrc21/full_labeled train.epochs=40      # a real dataset, the gain on its test split
Extra dotted overrides (the budget: train.epochs=.. data.steps_per_epoch=.. model.backbone=.. data.crop_size=..)
go to every run; both runs of a seed get exactly the same overrides except method.name. --labeled/--unlabeled/
--val set data.*; --precision sets train.precision. With --test DIR (a labeled shard set held out from training),
each run's best.pt (selected on val during training) is evaluated on DIR in whole-image mode with the trainer's
evaluate(), and the gain is the test mIoU's; without it, the final val mIoU's.

The demo budget (only with configs/demo.yaml): the demo data (16 labeled and 240 unlabeled train images; SGD,
published U2PL settings) with a lighter model (resnet10t, crop 48) and 1440 steps of 8 + 8 images. As in the
published settings, both runs start from a pretrained backbone: the demo backbone (u2pl_scale/data/demo_backbone.py,
pretrained on generated shape/texture classification images, the stand-in for ImageNet weights that cannot be
downloaded here; built on first use, about 2 minutes, then reused). From scratch, a CPU budget of minutes is
spent learning shape and texture at all, and the number of labels hardly matters (benchmarks/RESULTS.md).
Other configs start as the config says (--init pretrained: the demo backbone file, for model.backbone=resnet10t).
The runs train side by side, each on its share of the CPU cores (--jobs 1: one after the other on all of them);
small CPU models use two single-thread processes better than one process with two threads, so the pair takes
about the U2PL run's time alone. The test evaluations follow, after all runs, on all cores.
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
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEFAULT_BACKBONE = REPO / "shards" / "demo_backbone" / "resnet10t.safetensors"
DEMO_BUDGET = ["model.backbone=resnet10t", "data.crop_size=48", "train.epochs=12", "eval.interval_epochs=4"]


def titles(share: str) -> tuple[str, str, str]:
    """Table rows, in display order: supervised-only, U2PL, all labels."""
    return (f"supervised-only ({share} labels)", f"U2PL ({share} labels + unlabeled)",
            "supervised, all labels (reference)")


def label_share(labeled: str, unlabeled: str) -> str:
    """'1/16' (or '35/276') from the two sets' manifests; 'some' where they cannot be read."""
    try:
        n_l, n_u = (json.loads((Path(p) / "manifest.json").read_text())["num_samples"] for p in (labeled, unlabeled))
    except (OSError, TypeError, KeyError, ValueError):
        return "some"
    return f"1/{(n_l + n_u) // n_l}" if n_l and (n_l + n_u) % n_l == 0 else f"{n_l}/{n_l + n_u}"


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


def evaluate_on_test(run_dir: Path, test_set: str) -> dict:
    """A finished run's best.pt on a held-out labeled shard set, whole-image, with the trainer's evaluate() and the
    model built from the run's config.yaml (its data.mean/std, num_classes, ignore_index, precision)."""
    import torch

    from u2pl_scale.config import config_from_dict
    from u2pl_scale.data.stream import make_val_loader
    from u2pl_scale.data.transforms import normalize
    from u2pl_scale.engine.evaluate import evaluate
    from u2pl_scale.precision import autocast
    from u2pl_scale.model import build_model

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.data.val, cfg.model.pretrained = str(test_set), False  # the weights are best.pt's
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = build_model(cfg.model, cfg.data.num_classes)
    model.load_state_dict(best["model"])
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cpu = torch.device("cpu")

    def prepare(batch: dict):
        return normalize(batch["image"], cfg.data.mean, cfg.data.std, cfg.train.channels_last), batch["label"].long()

    result = evaluate(model, make_val_loader(cfg.data, 0, 1), prepare, cfg.data.num_classes, cfg.data.ignore_index,
                      "whole", cfg.eval.crop_size, cfg.eval.stride_rate, lambda: autocast(cfg.train.precision, cpu),
                      0, cfg.data.batch_size_val)
    return {"miou": result["miou"], "per_class_iou": result["per_class_iou"], "eval_mode": result["eval_mode"],
            "best_step": int(best["step"]), "best_val_miou": float(best["miou"])}


def start(name: str, out_root: Path, config: Path, threads: int, overrides: list[str]):
    run_dir = out_root / name
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "--config", str(config),
           f"train.run_dir={run_dir}", "train.progress_bar=false", f"train.num_threads={threads}", *overrides]
    print(f"[semi_gain] {name}: {' '.join(cmd[2:])}", flush=True)
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL), run_dir, time.time()


def finish(name: str, proc: subprocess.Popen, run_dir: Path, t0: float) -> dict:
    if proc.wait() != 0:
        raise SystemExit(f"[semi_gain] the {name} run failed (exit {proc.returncode}); see {run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["elapsed_s"] = time.time() - t0
    summary["seed"] = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"]  # as the run resolved it
    summary["run_dir"] = str(run_dir)
    return summary


def run_all(plan: dict, out_root: Path, config: Path, jobs: int) -> dict:
    """Run the planned runs ({key: (run directory name, overrides)}), `jobs` at a time, each on cpu_count // jobs
    threads, in the plan's order; their summaries by key."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results, pending, running = {}, list(plan.items()), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                key, (name, overrides) = pending.pop(0)
                running.append((key, name, *start(name, out_root, config, threads, overrides)))
            done = [entry for entry in running if entry[2].poll() is not None]
            for entry in done:
                running.remove(entry)
                key, *rest = entry
                results[key] = finish(*rest)
            if not done:
                time.sleep(1)
    finally:  # a failed run stops the benchmark: do not leave the others training in the background
        for _, _, proc, _, _ in running:
            proc.kill()
    return results


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.{split}={getattr(args, split)}" for split in ("labeled", "unlabeled", "val") if getattr(args, split)]


def plan_runs(args: argparse.Namespace, rows: tuple[str, str, str], init: list[str]) -> dict:
    """{(row title, seed): (run directory name, overrides)}, the longest runs first, so that with --jobs 2 the
    shorter ones fill the other slot. The arms of a seed share every override but the method (and, for the
    all-labels reference, the labeled set: args.full)."""
    common = [*(DEMO_BUDGET if args.config == DEMO_CONFIG else []), *init, *data_overrides(args),
              *([f"train.precision={args.precision}"] if args.precision else []), *args.overrides]
    supervised, u2pl, full = rows
    kinds = {u2pl: ("u2pl", ["method.name=u2pl"]), supervised: ("supervised", ["method.name=supervised"])}
    if args.full:
        kinds[full] = ("full", ["method.name=supervised", f"data.labeled={args.full}"])
    return {(title, seed): (name if seed is None else f"seed{seed}/{name}",
                            [*common, *([] if seed is None else [f"train.seed={seed}"]), *kind])
            for title, (name, kind) in kinds.items() for seed in args.seeds or [None]}


def seed_list(text: str) -> list[int]:
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"need distinct integer seeds, e.g. 0,1,2,3; got {text!r}")
    return seeds


def local_path(text: str) -> str:
    """A shard set or file given on the command line, absolute (the runs start in the repository); URLs as given."""
    return text if "://" in text or text.startswith("pipe:") else str(Path(text).resolve())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=lambda p: Path(p).resolve(), default=DEMO_CONFIG,
                        help="the runs' config (default: the demo, with the demo budget above)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "semi_gain"))
    for split in ("labeled", "unlabeled", "val"):
        parser.add_argument(f"--{split}", type=local_path, help=f"shard set for data.{split}")
    parser.add_argument("--test", type=local_path, help="held-out labeled shard set: each run's best.pt is "
                        "evaluated on it (whole image) and the gain is the test mIoU's")
    parser.add_argument("--full", nargs="?", const="", type=lambda p: p and local_path(p), metavar="DIR",
                        help="also train on all train labels (reference): DIR, or full_labeled beside data.labeled")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="train.precision of every run")
    parser.add_argument("--init", choices=["pretrained", "scratch", "config"], default=None,
                        help="backbone start: the demo backbone file (default with the demo config, as the "
                             "published settings start from ImageNet weights), random, or as the config says "
                             "(default otherwise)")
    parser.add_argument("--backbone-file", default=str(DEFAULT_BACKBONE),
                        help="pretrained weights (.safetensors); the default file is built when missing")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time, each on cpu_count // jobs threads (default: 2 side by side)")
    parser.add_argument("--seeds", type=seed_list, default=None,
                        help="comma-separated seeds (0,1,2,3): train every run once per seed (train.seed) and report "
                             "each seed's gain and their mean; default: one run each with the config's seed")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    args.init = args.init or ("pretrained" if args.config == DEMO_CONFIG else "config")
    return args


def gain_line(gains: list[float], seeds: list, on: str, timing: str) -> str:
    if len(gains) == 1:
        return f"\nU2PL gain over supervised-only{on}: {100 * gains[0]:+.2f} mIoU ({timing})"
    per_seed = ", ".join(f"{seed}: {100 * g:+.2f}" for seed, g in zip(seeds, gains))
    return (f"\nU2PL gain over supervised-only{on} by seed: {per_seed}\nU2PL gain over supervised-only{on}: mean "
            f"{100 * statistics.mean(gains):+.2f} mIoU over {len(gains)} seeds, standard deviation "
            f"{100 * statistics.stdev(gains):.2f}, min {100 * min(gains):+.2f} ({timing})")


def main() -> int:
    args = parse_args()
    out = Path(args.out).resolve()
    started = time.time()
    os.chdir(REPO)  # the config's shard paths are relative to the checkout, as in the runs below
    sys.path.insert(0, str(REPO))
    from u2pl_scale.config import ConfigError, load_config
    from u2pl_scale.engine.trainer import ensure_demo_data

    try:
        cfg = load_config(str(args.config), [o for o in args.overrides if o.startswith("data.")] + data_overrides(args))
        ensure_demo_data(cfg)  # once, before runs that would race to it; and every set must exist
    except (ConfigError, FileNotFoundError) as error:
        raise SystemExit(f"[semi_gain] {error}") from None
    if args.full == "":  # --full without DIR: the all-labels set beside the labeled one, as the builders write it
        args.full = str(Path(cfg.data.labeled).parent / "full_labeled")
    for extra in (args.test, args.full):
        if extra and "://" not in extra and not (Path(extra) / "manifest.json").is_file():
            raise SystemExit(f"[semi_gain] shard set not found (no manifest.json): {extra}")
    init = {"scratch": ["model.pretrained=false"], "config": []}.get(args.init)
    if init is None:
        backbone = Path(args.backbone_file).resolve()
        ensure_backbone(backbone)
        init = ["model.pretrained=true", f"model.pretrained_path={backbone}"]
    rows = titles(label_share(cfg.data.labeled, cfg.data.unlabeled))
    plan = plan_runs(args, rows, init)
    t0 = time.time()
    runs = run_all(plan, out, args.config, args.jobs)
    train_s = time.time() - t0
    if args.test:
        for run in runs.values():
            run["test"] = evaluate_on_test(Path(run["run_dir"]), args.test)
    seeds = args.seeds or [None]
    score = (lambda run: run["test"]["miou"]) if args.test else (lambda run: run["miou"])
    gains = [score(runs[rows[1], seed]) - score(runs[rows[0], seed]) for seed in seeds]
    test_col = (" test mIoU (%) |", " --- |") if args.test else ("", "")
    print(f"\n| run | seed | val mIoU (%) |{test_col[0]} steps | wall (s) | eval |")
    print(f"| --- | --- | --- |{test_col[1]} --- | --- | --- |")
    for seed in seeds:
        for title in (row for row in rows if (row, seed) in runs):
            s = runs[title, seed]
            test = f" {100 * s['test']['miou']:.2f} |" if args.test else ""
            print(f"| {title} | {s['seed']} | {100 * s['miou']:.2f} |{test} {s['steps']} | "
                  f"{s['elapsed_s']:.0f} | {s['eval_mode']} |")
    timing = f"training {train_s:.0f} s, {args.jobs} run(s) at a time; {time.time() - started:.0f} s in all"
    print(gain_line(gains, seeds, " on test" if args.test else "", timing))
    table = {title if seed is None else f"{title}, seed {seed}": {
        "miou": run["miou"], "best_val_miou": run["best_miou"], "steps": run["steps"], "seed": run["seed"],
        "elapsed_s": run["elapsed_s"], "eval_mode": run["eval_mode"], "run_dir": run["run_dir"],
        **({"test": run["test"]} if args.test else {})} for (title, seed), run in runs.items()}
    table["gain"] = {"on": "test" if args.test else "val", "config": str(args.config), "test_set": args.test,
                     "by_seed": dict(zip(map(str, seeds), gains)), "mean": statistics.mean(gains), "min": min(gains),
                     "stdev": statistics.stdev(gains) if len(gains) > 1 else None}
    (out / "table.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
