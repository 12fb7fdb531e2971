"""fp32 against bf16 autocast on this CPU: the demo's models, forward + backward, channels-last.

Why `train.precision: auto` exists: on a CPU whose oneDNN has no bf16 kernels (x86 with AVX2 only) bf16 is
emulated and far slower than fp32; with AVX-512 or AMX it is the faster one. Prints, per model, the median
milliseconds per forward + backward in each precision, their ratio, and what `auto` picks here
(u2pl_scale/precision.py: native_bf16).

    python benchmarks/cpu_precision.py [--threads 2] [--steps 3]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from u2pl_scale.config import load_config  # noqa: E402
from u2pl_scale.data.demo_backbone import PretrainSettings  # noqa: E402
from u2pl_scale.precision import native_bf16, resolve_precision  # noqa: E402
from u2pl_scale.model import build_model  # noqa: E402


def time_step(model: torch.nn.Module, x: torch.Tensor, loss_of, bf16: bool, steps: int) -> float:
    """Median seconds of one forward (under bf16 autocast if asked) + backward, after one warm-up step."""
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss_of(out).backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    batch = cfg.data.batch_size_labeled + cfg.data.batch_size_unlabeled
    segmenter = build_model(cfg.model, cfg.data.num_classes).to(memory_format=torch.channels_last)
    crop = torch.randn(batch, 3, cfg.data.crop_size, cfg.data.crop_size).contiguous(memory_format=torch.channels_last)

    import timm

    settings = PretrainSettings()
    backbone = timm.create_model(settings.backbone, features_only=True).to(memory_format=torch.channels_last)
    images = torch.randn(settings.batch_size, 3, settings.size, settings.size)
    images = images.contiguous(memory_format=torch.channels_last)
    cases = [
        (f"demo DeepLabV3+ {cfg.model.backbone}, {batch} x {cfg.data.crop_size}^2 (a training step's student)",
         segmenter, crop, lambda out: out["pred"].float().mean() + out["rep"].float().mean()),
        (f"demo-backbone pretraining {settings.backbone}, {settings.batch_size} x {settings.size}^2", backbone,
         images, lambda out: out[-1].float().mean()),
    ]
    cpu = torch.device("cpu")
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; native bf16: {native_bf16(cpu)}; "
          f"train.precision=auto runs {resolve_precision('auto', cpu)}")
    print("| model | fp32 ms | bf16 autocast ms | bf16 / fp32 |")
    print("| --- | --- | --- | --- |")
    for name, model, x, loss_of in cases:
        fp32 = time_step(model, x, loss_of, False, args.steps)
        bf16 = time_step(model, x, loss_of, True, args.steps)
        print(f"| {name} | {1000 * fp32:.0f} | {1000 * bf16:.0f} | {bf16 / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
