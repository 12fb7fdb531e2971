#!/usr/bin/env python
"""Export a trained checkpoint's evaluated network to ONNX or TorchScript, dynamic in batch, height and width.

    python launchers/export.py --checkpoint runs/demo --format onnx --out runs/demo/model.onnx
    python launchers/export.py --checkpoint runs/demo/best.pt --format torchscript --out runs/demo/model.ts
Input: float32 [B, 3, H, W], RGB, 0..255 (normalisation is inside); output: logits [B, C, H, W] at the input size
(whole-image inference). <out>.json records the classes and the input convention.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import u2pl_scale  # noqa: E402,F401


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, best.pt or state.pt")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    args = p.parse_args(argv)

    from u2pl_scale.inference.checkpoint import CheckpointError, load_checkpoint
    from u2pl_scale.inference.export import export_model

    try:
        loaded = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            print("error: --format onnx needs the onnx package: pip install -e '.[export]'", file=sys.stderr)
            return 2
    out = export_model(loaded, args.format, args.out, opset=args.opset)
    print(f"wrote {out} ({args.format}, {loaded.meta['evaluated_model']} of step {loaded.meta.get('step')}, "
          f"{loaded.num_classes} classes) and {out.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
