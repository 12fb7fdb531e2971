"""Build WebDataset shard sets (labeled / unlabeled / val + manifest.json each) for u2pl-scale.

Run from the repository root, no install needed:
    python shards/build.py demo [--out shards/demo] [--seed 0] [--num-train 256] [--labeled-fraction 0.0625]
    python shards/build.py demo-backbone [--out shards/demo_backbone/resnet10t.safetensors] [--steps 1000]
    python shards/build.py voc --root VOCdevkit/VOC2012 --split-file labeled.txt [--out shards/voc]
    python shards/build.py cityscapes --root cityscapes --split-file labeled.txt [--out shards/cityscapes]
    python shards/build.py coco --root coco [--split-file labeled.txt] [--unlabeled-dir unlabeled2017]
    python shards/build.py folder --images DIR --masks DIR --num-classes N [--labeled-list F] [--val-list F] ...
    python shards/build.py inspect shards/voc        (read-only check of built shards)
See shards/README.md for every option.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# demo-backbone is one process with the cores to itself: there, OpenMP workers that spin between ops train about
# 1.4x faster than the sleeping workers the package sets by default for several processes sharing the cores, with
# identical weights (benchmarks/RESULTS.md). Read once when torch loads, so set before the imports below.
if sys.argv[1:2] == ["demo-backbone"]:
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from u2pl_scale.data import datasets  # noqa: E402
from u2pl_scale.data.demo import build_demo  # noqa: E402
from u2pl_scale.data.inspect_shards import inspect_shards  # noqa: E402
from u2pl_scale.data.shard_format import SPLITS  # noqa: E402
from u2pl_scale.data.writer import ShardWriteError, parse_size  # noqa: E402


def _summarise(manifests: dict[str, dict], out_root: Path) -> None:
    for name, manifest in manifests.items():
        print(f"{out_root / name}: {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s)")


def _run_demo(args: argparse.Namespace) -> None:
    manifests = build_demo(args.out, seed=args.seed, num_train=args.num_train,
                           labeled_fraction=args.labeled_fraction, num_val=args.num_val, size=args.size,
                           samples_per_shard=args.max_count, workers=args.workers)
    _summarise(manifests, Path(args.out))


def _run_demo_backbone(args: argparse.Namespace) -> None:
    from u2pl_scale.data.demo_backbone import PretrainSettings, pretrain_backbone

    report = pretrain_backbone(args.out, PretrainSettings(backbone=args.backbone, steps=args.steps,
                                                          num_images=args.num_images, seed=args.seed))
    print(f"{args.out}: {args.backbone}, {args.steps} steps, held-out shape / texture accuracy "
          f"{report['held_out_shape_accuracy']:.3f} / {report['held_out_texture_accuracy']:.3f}")


def _build(source: datasets.DatasetSource, args: argparse.Namespace) -> None:
    manifests = datasets.build_dataset(source, args.out, workers=args.workers, max_count=args.max_count,
                                       max_bytes=args.shard_size)
    _summarise(manifests, Path(args.out))


def _run_voc(args: argparse.Namespace) -> None:
    _build(datasets.voc_source(args.root, args.split_file, args.aug_dir, splits=args.splits), args)


def _run_cityscapes(args: argparse.Namespace) -> None:
    _build(datasets.cityscapes_source(args.root, args.split_file, splits=args.splits), args)


def _run_coco(args: argparse.Namespace) -> None:
    _build(datasets.coco_source(args.root, args.split_file, args.unlabeled_dir, splits=args.splits), args)


def _run_folder(args: argparse.Namespace) -> None:
    label_map = datasets.read_label_map(args.label_map) if args.label_map else None
    class_names = args.class_names.split(",") if args.class_names else None
    source = datasets.folder_source(args.images, args.masks, args.num_classes, args.labeled_list,
                                    args.unlabeled_list, args.unlabeled_dir, args.val_list, args.ignore_index,
                                    label_map, class_names, args.name, splits=args.splits)
    _build(source, args)


def _run_inspect(args: argparse.Namespace) -> None:
    report = inspect_shards(args.target)
    print(report.format())
    if report.problems:
        raise SystemExit(1)


def _splits(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(chosen) - set(SPLITS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"splits must be a comma list of {', '.join(SPLITS)}")
    return chosen


def _add_output_options(command: argparse.ArgumentParser, default_out: str) -> None:
    command.add_argument("--out", default=default_out, help=f"output root (default: {default_out})")
    command.add_argument("--splits", type=_splits, default=SPLITS,
                         help="comma list of splits to build (default: labeled,unlabeled,val)")
    command.add_argument("--workers", type=int, default=1, help="encoding processes")
    bound = command.add_mutually_exclusive_group()
    bound.add_argument("--shard-size", type=parse_size, default=None,
                       help="maximum shard size, e.g. 500MB or 1GB (default: 256MB)")
    bound.add_argument("--max-count", type=int, default=None, help="maximum samples per shard")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shards/build.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="procedurally generated shapes-and-textures demo dataset")
    demo.add_argument("--out", default="shards/demo", help="output root (default: shards/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-train", type=int, default=256, help="train images (labeled + unlabeled)")
    demo.add_argument("--labeled-fraction", type=float, default=1 / 16, help="labeled share of the train images")
    demo.add_argument("--num-val", type=int, default=128)
    demo.add_argument("--size", type=int, default=96, help="image height = width in pixels")
    demo.add_argument("--max-count", type=int, default=64, help="samples per shard")
    demo.add_argument("--workers", type=int, default=1, help="encoding processes")
    demo.set_defaults(run=_run_demo)

    backbone = commands.add_parser(
        "demo-backbone", help="pretrain a backbone for the demo on generated shape/texture classification "
                              "images (the stand-in for ImageNet weights; see u2pl_scale/data/demo_backbone.py)")
    backbone.add_argument("--out", default="shards/demo_backbone/resnet10t.safetensors")
    backbone.add_argument("--backbone", default="resnet10t", help="timm model name")
    backbone.add_argument("--steps", type=int, default=1000)
    backbone.add_argument("--num-images", type=int, default=8192)
    backbone.add_argument("--seed", type=int, default=0)
    backbone.set_defaults(run=_run_demo_backbone)

    voc = commands.add_parser("voc", help="Pascal VOC 2012 with SBD aug masks")
    voc.add_argument("--root", required=True, help="VOCdevkit/VOC2012")
    voc.add_argument("--split-file", help="labeled ids (U2PL splits: ids or 'JPEGImages/x.jpg ...' lines)")
    voc.add_argument("--aug-dir", default="SegmentationClassAug", help="aug masks, relative to --root")
    _add_output_options(voc, "shards/voc")
    voc.set_defaults(run=_run_voc)

    cityscapes = commands.add_parser("cityscapes", help="Cityscapes fine (label ids -> 19 train ids)")
    cityscapes.add_argument("--root", required=True, help="directory holding leftImg8bit/ and gtFine/")
    cityscapes.add_argument("--split-file", help="labeled train ids (default: all train images)")
    _add_output_options(cityscapes, "shards/cityscapes")
    cityscapes.set_defaults(run=_run_cityscapes)

    coco = commands.add_parser("coco", help="COCO 2017 instances rasterised to 81-class semantic masks")
    coco.add_argument("--root", required=True, help="directory holding train2017/, val2017/, annotations/")
    coco.add_argument("--split-file", help="labeled subset of train2017 (file names or ids); the rest is unlabeled")
    coco.add_argument("--unlabeled-dir", help="extra unlabeled images: a path, or relative to --root (unlabeled2017)")
    _add_output_options(coco, "shards/coco")
    coco.set_defaults(run=_run_coco)

    folder = commands.add_parser("folder", help="a folder of images and a folder of class-index masks")
    folder.add_argument("--images", required=True, help="image directory (files matched to masks by stem)")
    folder.add_argument("--masks", help="mask directory: single-channel PNG/BMP/TIFF class indices")
    folder.add_argument("--num-classes", type=int, required=True)
    folder.add_argument("--labeled-list", help="stems of the labeled images, one a line")
    unlabeled = folder.add_mutually_exclusive_group()
    unlabeled.add_argument("--unlabeled-list", help="stems of unlabeled images in --images")
    unlabeled.add_argument("--unlabeled-dir", help="directory whose every image is unlabeled")
    folder.add_argument("--val-list", help="stems of the validation images")
    folder.add_argument("--ignore-index", type=int, help="mask value meaning 'ignore'; stored as 255")
    folder.add_argument("--label-map", help="JSON {src: dst} or 'src dst' lines applied to mask values")
    folder.add_argument("--class-names", help="comma-separated class names")
    folder.add_argument("--name", default="folder", help="dataset name in the manifests")
    _add_output_options(folder, "shards/folder")
    folder.set_defaults(run=_run_folder)

    inspect = commands.add_parser("inspect", help="check built shards (read-only)")
    inspect.add_argument("target", help="a shard set directory, a directory of sets, a .tar or a glob pattern")
    inspect.set_defaults(run=_run_inspect)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        args.run(args)
    except (datasets.DatasetError, ShardWriteError) as error:
        raise SystemExit(f"error: {error}") from None
    if args.command != "inspect":
        print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
