#!/usr/bin/env python
"""Predict segmentation masks for images with a trained checkpoint.

    python launchers/predict.py --checkpoint runs/demo --input photos/ --out masks/ --overlay
    python launchers/predict.py --checkpoint runs/demo/best.pt --input "shots/*.jpg" a.png b.tif --out masks/
Writes <out>/<name>.png for every input (a palette PNG: pixel value = class index, colours = the VOC map; names
keep the input's path relative to an input directory), with --overlay also <out>/overlays/<name>.png and
<out>/contact_sheet.png (the first 64 images). Any size and kind of image is read (greyscale, palette, RGBA,
16-bit, EXIF-rotated); images whose long side exceeds --max-whole are run in sliding windows in --mode auto.
Each mask is written atomically. Unreadable images are skipped, listed at the end and in <out>/failed.txt.
Exit code: 0 when at least one mask was written (failures are listed and counted in the summary; --strict makes
any failure exit 1), 1 when none was, 2 for a bad checkpoint or no inputs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import u2pl_scale  # noqa: E402,F401  (CPU threading environment before torch loads)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, best.pt or state.pt")
    p.add_argument("--input", nargs="+", required=True, help="directories, files or glob patterns")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overlay", action="store_true", help="also write overlays and a contact sheet")
    p.add_argument("--mode", choices=["auto", "whole", "sliding", "center"], default="auto",
                   help="auto: the run's eval.mode, sliding for images longer than --max-whole")
    p.add_argument("--crop", type=int, default=None, help="window size (default: the run's eval.crop_size)")
    p.add_argument("--max-whole", type=int, default=2048, help="--mode auto: longest side run as a whole image")
    p.add_argument("--scales", default="1", help="comma-separated test scales")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--batch", type=int, default=1, help="images of equal size per forward")
    p.add_argument("--strict", action="store_true", help="exit 1 when any input failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from u2pl_scale.inference.checkpoint import CheckpointError, load_checkpoint
    from u2pl_scale.inference.images import (collect_inputs, contact_sheet, load_rgb, mask_image, overlay,
                                             save_atomic)
    from u2pl_scale.inference.predictor import Predictor, center_box, parse_scales, pick_device

    try:
        loaded = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        inputs = collect_inputs(args.input)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not inputs:
        print(f"error: no images found in {args.input}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    if device.type == "cpu":
        from u2pl_scale import dist
        torch.set_num_threads(dist.cpu_threads_per_rank())
    base_mode = (loaded.meta.get("eval") or {}).get("mode", "whole") if args.mode == "auto" else args.mode
    predictor = Predictor(loaded.model, loaded.meta, mode=base_mode, crop=args.crop, scales=parse_scales(args.scales),
                          flip=args.flip, device=device, precision=args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Path, str]] = []
    written = 0
    sheet: list = []

    def mode_for(h: int, w: int) -> str:
        if args.mode == "auto" and base_mode == "whole" and max(h, w) > args.max_whole:
            return "sliding"
        return base_mode

    def flush(pending: list) -> None:
        nonlocal written
        if not pending:
            return
        try:
            batch = torch.from_numpy(np.stack([img for _, _, img in pending])).permute(0, 3, 1, 2)
            masks = predictor.predict(batch, mode_for(*batch.shape[-2:])).numpy().astype(np.uint8)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory on one huge image: the others go on)
            failed.extend((f, f"inference failed: {type(e).__name__}: {e}") for f, _, _ in pending)
            return
        for (f, name, img), mask in zip(pending, masks):
            try:
                save_atomic(mask_image(mask), out / f"{name}.png")
                if args.overlay:
                    if predictor.mode == "center":
                        t, l, b, r = center_box(img.shape[0], img.shape[1], predictor.crop)
                        img = img[t:b, l:r]
                    over = overlay(img, mask)
                    save_atomic(Image.fromarray(over), out / "overlays" / f"{name}.png")
                    if len(sheet) < 64:
                        sheet.append((img, over))
                written += 1
            except Exception as e:  # noqa: BLE001
                failed.append((f, f"write failed: {type(e).__name__}: {e}"))

    pending: list = []
    for f, name in tqdm(inputs, desc="predict", unit="img", disable=args.no_progress, dynamic_ncols=True):
        try:
            img = load_rgb(f)
        except Exception as e:  # noqa: BLE001  (unreadable, truncated, not an image)
            failed.append((f, f"unreadable: {type(e).__name__}: {e}"))
            continue
        if pending and (img.shape != pending[0][2].shape or len(pending) >= args.batch):
            flush(pending)
            pending = []
        pending.append((f, name, img))
    flush(pending)
    if args.overlay and sheet:
        contact_sheet(sheet, out / "contact_sheet.png")
    failed_file = out / "failed.txt"
    if failed:
        failed_file.write_text("".join(f"{f}\t{why}\n" for f, why in failed))
    elif failed_file.exists():
        failed_file.unlink()
    print(f"{written} of {len(inputs)} images written to {out} ({predictor.describe()['mode']} mode, "
          f"{predictor.precision}, {device}); {len(failed)} failed")
    for f, why in failed:
        print(f"  failed: {f}: {why}")
    if written == 0:
        return 1
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
