"""Where one U2PL training step spends its time (U2PL_SPEC.md section 3), on the real model.

Two measurements per run:
- total: the real step, `Trainer.train_step` of a Trainer built from the config (the trainer's models, engine,
  optimiser, queues and method stages; this script feeds it batches): prepare (H2D, normalise), `u2pl_step`,
  backward, optimiser + LR schedule step, the non-finite guard, EMA update. No synchronisation inside the step
  (one at its end, to time it). On GPU the host-device syncs inside these steps are counted with
  torch.cuda.set_sync_debug_mode("warn") (no logging steps are run, so this must be 0).
- breakdown: the same work cut into parts, with a device synchronize between parts (separate steps, so the syncs do
  not disturb the total):
    data wait        next batch (synthetic uint8 batches kept in host memory, or the demo shards) + prepare
    teacher forward  eval-mode pseudo-labels on x_u (+ upsample, softmax) + CutMix + train-mode forward on
                     cat(x_l, x_u) (+ softmax, upsample of the unlabeled logits), no grad
    student fwd+bwd  student forward on cat(x_l, x_u), supervised loss, and the backward of everything through the
                     student (the method's gradients enter at the student's outputs)
    method work      upsample of the student's unlabeled logits, reliability (entropy, percentiles), unsup loss,
                     contrastive inputs/masks/loss, queue push (distributed call path) and sampling, and their
                     backward down to the student's outputs (pred, rep) - what benchmarks/method_overhead.py times
    optimizer+EMA    optimiser step, zero_grad, LR schedule step, EMA teacher update
  The breakdown pieces call the same functions as u2pl_step (method functions from u2pl_scale.method).

Prints a markdown table: median ms per part, % of the breakdown's sum, method work as % of the step, images/s from
the total, peak memory (torch.cuda.max_memory_allocated on GPU; ru_maxrss of the process on CPU), the model FLOPs
of a step (torch.utils.flop_counter) and, on GPU, the MFU against a measured matmul peak.

The breakdown's synced parts charge each part its full launch time: a part made of many small kernels (the
method work) costs its CPU launch time there, while in the real step those launches overlap the GPU's queue of
model work. So the method's cost is also given at the margin: the real step timed again without the method work
(same teacher forwards, student forward, full backward with zero gradients where the method's enter, optimizer
and EMA), and 1 - without / with. The steps with and without the method are timed interleaved, alternating
which comes first, so that a drift of the machine's speed falls on both (the median of each, and the spread of
the per-pair figure, are printed). On a CPU the step's own spread (+-15 %) is larger than the method's share.
Those pairs cannot see a cost that the method puts on the whole process (both sides run in it): the step without
the method is therefore also timed first, before any step with the method has run (nothing compiled yet), and
again after the breakdown steps; with the method eager the two show the machine's drift alone.

CPU-sized default (about 1-2 minutes on a loaded 2-core CPU): resnet18, crop 129, 2 + 2 images, VOC (21 classes,
full-size queues 50000 + 20 x 30000 of 256-d). On GPU the default is the config's model and crop, 2 + 2.
    python benchmarks/step_breakdown.py [--device cpu|cuda] [--backbone resnet18] [--crop 129] [--batch 2]
        [--precision fp32|bf16] [--channels-last] [--steps 5] [--warmup 2] [--data synthetic|demo] [--threads 2]
        [--compile-method [MODE]] [--compile-model [MODE]] [--no-fused-optimizer] [--profile-step [ROWS]]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # see benchmarks/method_overhead.py
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ["OMP_WAIT_POLICY"].lower() == "default":  # measure libgomp's default (spin a while, then sleep)
    del os.environ["OMP_WAIT_POLICY"]

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from u2pl_scale.config import COMPILE_METHOD_MODES, MODEL_COMPILE_MODES, load_config  # noqa: E402
from u2pl_scale.engine.step import (  # noqa: E402
    begin_model_step,
    method_runs_in_graph,
    method_runs_in_profile,
    run_method_losses,
    pseudo_labels,
    supervised_loss,
    teacher_targets,
)
from u2pl_scale.engine.trainer import Trainer  # noqa: E402
from u2pl_scale.method import ema  # noqa: E402
from u2pl_scale.precision import DTYPES  # noqa: E402

PARTS = ("data wait", "teacher forward", "student fwd+bwd", "method work", "optimizer+EMA")
PROGRESS = 0.1  # epoch / epochs: drop 18 %, alpha_t 18 %


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_peak(device: torch.device, precision: str) -> float:
    """FLOP/s of a large square matmul in the run's precision (the ceiling MFU is quoted against)."""
    dtype = DTYPES[precision]
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    matmul = torch.backends.cuda.matmul
    # saved as fp32_precision where torch has it: allow_tf32 restored to False reads back as "ieee", not the default
    # "none", which is another global state than before
    setting = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = getattr(matmul, setting)
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32  # fp32 convolutions run as TF32
    try:
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
    finally:
        setattr(matmul, setting, saved)
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000)


def describe_optimizer(optimizer) -> str:
    group = optimizer.param_groups[0]
    kind = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"
    return f"{type(optimizer).__name__} ({kind})"


def profile_one_step(step, on_gpu: bool, rows: int) -> str:
    """The top `rows` ops and kernels of one call of `step` by self GPU time (self CPU time on a CPU), and on a GPU
    the share of the step's wall time in which a kernel ran (near 100 %: GPU-bound; far below: the host's launches
    set the pace)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    lines = [f"one real step, profiled: {1000 * wall:.1f} ms wall (profiler overhead included); top {rows} by {key}"]
    if on_gpu:
        try:  # kernels, copies and memsets; a sum, so kernels overlapping on two streams count twice
            kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
            lines.append(f"GPU activities: {len(kernels)}, {1000 * busy:.1f} ms summed, "
                         f"{100 * busy / wall:.0f} % of the step's wall time")
        except Exception as error:  # the table below is the point; this summary must not lose it
            lines.append(f"GPU activity sum unavailable: {error!r}")
    lines.append(averages.table(sort_by=key, row_limit=rows, max_name_column_width=70))
    return "\n".join(lines)


def synthetic_batches(cfg, batch: int, crop: int, count: int, seed: int = 0):
    """`count` labeled + unlabeled uint8 batches as the shard stream yields them (channels-last images)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        def image():
            return torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=gen).contiguous(
                memory_format=torch.channels_last)
        label = torch.randint(0, cfg.data.num_classes, (batch, crop, crop), dtype=torch.uint8, generator=gen)
        label[:, : crop // 16] = cfg.data.ignore_index
        keys = [f"synthetic/{len(out)}/{i}" for i in range(batch)]
        out.append(({"image": image(), "label": label, "key": keys},
                    {"image": image(), "valid": torch.ones(batch, crop, crop, dtype=torch.bool), "key": keys}))
    while True:
        yield from out


def demo_batches(cfg, batch: int, total_steps: int):
    from u2pl_scale.data import stream

    loader_l = stream.make_train_loader(cfg.data, "labeled", batch, 0, 1, 0, 0, total_steps)
    loader_u = stream.make_train_loader(cfg.data, "unlabeled", batch, 0, 1, 0, 0, total_steps)
    yield from zip(loader_l, loader_u)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default=str(ROOT / "configs" / "voc_1464.yaml"))
    parser.add_argument("--backbone", default=None, help="timm name (default: the config's on GPU, resnet18 on CPU)")
    parser.add_argument("--crop", type=int, default=None, help="default: the config's on GPU, 129 on CPU")
    parser.add_argument("--batch", type=int, default=2, help="B_l = B_u per step")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per mode (default 3 CPU, 10 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="default 1 CPU, 3 GPU")
    parser.add_argument("--data", choices=["synthetic", "demo"], default="synthetic",
                        help="demo: the shards under shards/demo (6 classes; build them with shards/build.py demo)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--compile-method", nargs="?", const="reduce-overhead", default=None,
                        choices=COMPILE_METHOD_MODES,
                        help="train.compile_method with this train.compile_method_mode (default reduce-overhead: CUDA "
                             "graphs on a GPU): the method losses under torch.compile (compiled in warm-up)")
    parser.add_argument("--profile-method", action="store_true",
                        help="print a torch.profiler table (by self CPU time) of the method work of one breakdown step")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="train.cudnn_benchmark=false (cuDNN's heuristic convolution algorithms, no autotuning)")
    parser.add_argument("--compile-model", nargs="?", const="default", default=None, choices=MODEL_COMPILE_MODES,
                        help="train.compile with this train.compile_mode (default: default; reduce-overhead: the "
                             "model replayed as CUDA graphs on a GPU): the student's and the teacher's forward")
    parser.add_argument("--no-fused-optimizer", action="store_true", help="optim.fused=false (the foreach kernels)")
    parser.add_argument("--profile-step", type=int, nargs="?", const=25, default=0, metavar="ROWS",
                        help="after the timed steps, profile one real step and print its top ROWS ops and kernels "
                             "by self GPU time (CPU time on a CPU), and how busy the GPU was during the step")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (10 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    config = load_config(args.config)  # on a GPU the config's own model and crop (the published setting)
    backbone = args.backbone or (config.model.backbone if on_gpu else "resnet18")
    crop = args.crop or (config.data.crop_size if on_gpu else 129)
    overrides = [f"model.backbone={backbone}", "model.pretrained=false", f"data.crop_size={crop}",
                 f"train.precision={args.precision}"]
    if backbone != config.model.backbone:  # the config's multi-grid fits its own backbone only
        overrides += ["model.multi_grid=[]"]
    if args.no_cudnn_benchmark:
        overrides += ["train.cudnn_benchmark=false"]
    if args.compile_model:
        overrides += ["train.compile=true", f"train.compile_mode={args.compile_model}"]
    if args.no_fused_optimizer:
        overrides += ["optim.fused=false"]
    if args.compile_method:
        overrides += ["train.compile_method=true", f"train.compile_method_mode={args.compile_method}"]
    if args.data == "demo":
        overrides += [f"data.labeled={ROOT / 'shards/demo/labeled'}",
                      f"data.unlabeled={ROOT / 'shards/demo/unlabeled'}", "data.num_classes=6", "data.num_workers=1"]
    # the trainer's own set-up (models, engine, optimiser, schedule, queues, the method's stages) and step; this
    # script feeds the batches and times the parts
    overrides += [f"train.device={device.type}", f"train.channels_last={str(args.channels_last).lower()}",
                  f"train.num_threads={0 if on_gpu else args.threads}", "method.sup_only_epoch=0",
                  "data.unlabeled_size=100000", "train.log_interval=1000000000", "train.progress_bar=false",
                  f"train.run_dir={tempfile.mkdtemp(prefix='step_breakdown_')}"]
    cfg = load_config(args.config, overrides)
    torch.manual_seed(0)
    trainer = Trainer(cfg, check_data=args.data == "demo")
    sc, model, teacher, queues = trainer.sc, trainer.module, trainer.teacher, trainer.queues
    optimizer, scheduler = trainer.backend.optimizer, trainer.backend.scheduler
    num_classes = cfg.data.num_classes
    total_steps = 3 * (args.steps + args.warmup) + 1  # real, without-method and timed steps, + the FLOP count
    queues.buffer.normal_()  # steady state: full queues of unit rows
    queues.buffer.div_(queues.buffer.norm(dim=1, keepdim=True))
    queues.fill.copy_(queues.capacities)
    autocast_ctx = trainer.autocast_ctx
    batches = (demo_batches(cfg, args.batch, total_steps) if args.data == "demo"
               else synthetic_batches(cfg, args.batch, crop, 4))

    def prepare(batch_l, batch_u):
        x_l, y_l = trainer.prepare(batch_l)
        x_u, _ = trainer.prepare(batch_u, with_label=False)
        return x_l, y_l, x_u, batch_u["valid"].to(device, non_blocking=True)

    def optimizer_and_ema():
        """The parts' optimiser step and EMA update (Trainer.train_step's, without its non-finite guard)."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update_(teacher, model, trainer.steps_since_copy, cfg.method.ema_decay)
        trainer.steps_since_copy += 1

    # ---------------------------------------------------------------- total: the real step, no inner syncs
    def real_step(step_config=None, inspect=None):
        """Trainer.train_step, as training runs it; `inspect(loss)` reads the step's autograd graph after it."""
        batch_l, batch_u = next(batches)
        trainer.sc = step_config or sc
        try:
            terms, semi = trainer.train_step(batch_l, batch_u, PROGRESS)
        finally:
            trainer.sc = sc
        assert semi
        if inspect is not None:
            inspect(terms["loss"])

    def forward(mark=lambda name: None):
        """Data, teacher forwards and the student forward with its supervised loss, as u2pl_step does them;
        `mark(part)` is called after each part."""
        begin_model_step(sc)  # as Trainer.train_step does
        batch_l, batch_u = next(batches)
        x_l, y_l, x_u, valid_u = prepare(batch_l, batch_u)
        mark("data wait")
        b_l = x_l.shape[0]
        x_u, pseudo_u = pseudo_labels(sc, teacher, x_u, valid_u, autocast_ctx)
        x_all = torch.cat([x_l, x_u])
        prob_t, rep_t, logits_u_t = teacher_targets(teacher, x_all, b_l, autocast_ctx)
        mark("teacher forward")
        with autocast_ctx():
            out = model(x_all)
        pred, rep = out["pred"].float(), out["rep"].float()
        aux = out.get("aux")
        sup = supervised_loss(sc, pred[:b_l], aux[:b_l] if aux is not None else None, y_l)
        mark("student fwd+bwd")  # forward part; the backward is added by the caller
        return sup, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t

    # ------------------------------------------ the same step without the method work (for its marginal cost)
    def real_step_without_method():
        sup, pred, rep = forward()[:3]
        # the full backward through the student, with zero gradients where the method's would enter
        torch.autograd.backward([sup, pred, rep], [None, torch.zeros_like(pred), torch.zeros_like(rep)])
        optimizer_and_ema()

    # ---------------------------------------------------------------- breakdown: same work, timed parts
    def timed_step(times: dict, method_ctx=contextlib.nullcontext):
        last = [0.0]

        def mark(name):
            sync(device)
            now = time.perf_counter()
            times.setdefault(name, []).append(now - last[0])
            last[0] = now

        sync(device)
        last[0] = time.perf_counter()
        sup, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t = forward(mark)

        # the method's losses on leaf copies of the student's outputs, so their backward stops there
        pred_leaf = pred.detach().requires_grad_()
        rep_leaf = rep.detach().requires_grad_()
        with method_ctx():
            unsup, contra, _ = run_method_losses(sc, pred_leaf, rep_leaf, y_l, pseudo_u, prob_t, rep_t, logits_u_t,
                                                 queues, PROGRESS)
            (sc.unsup_weight * unsup + sc.contra_weight * contra).backward()
            mark("method work")

        torch.autograd.backward([sup, pred, rep], [None, pred_leaf.grad, rep_leaf.grad])
        mark("student fwd+bwd (backward)")
        times["student fwd+bwd"][-1] += times.pop("student fwd+bwd (backward)")[0]

        optimizer_and_ema()
        mark("optimizer+EMA")

    probes = []

    def probe(phase: str, cuda_activity: bool = False):
        """With the method compiled: whether one real step ran the compiled method, after each phase of this
        benchmark (on the H100's torch 2.11 the method ran eager after the FLOP count, which then ran it under
        FlopCounterMode: see there), read from the step's autograd graph. No profiler between timed phases: a
        profile of CUDA activity leaves NVIDIA's CUPTI attached to the process once inductor's CUDA graphs are in
        use (inductor turns CUPTI teardown off for them, pytorch/pytorch#144455), and every later kernel launch
        pays for it. The CUDA graph replays are counted by the last probe alone (`cuda_activity`), after
        everything is timed."""
        if not args.compile_method:
            return
        runs = {}
        if cuda_activity and on_gpu:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                real_step()
                sync(device)
            runs = method_runs_in_profile(prof)
        else:
            real_step(inspect=lambda loss: runs.update(method_runs_in_graph(loss)))
            sync(device)
        launches = runs.get("graph_launches", "(not profiled)")
        regions = runs["compiled"] + runs["captured"]
        probes.append(f"| after {phase} | {regions} | {launches} | {runs['eager']} |")

    # the model's part of the step alone (no method), before anything compiled has run and again after every timed
    # phase: whether compiling the method (or a probe) slows the process's other work, which the interleaved
    # with / without pairs below cannot see (both sides run in the same, possibly slowed, process)
    def synced_seconds(step_fn) -> float:
        """One call of step_fn, timed from an idle device to an idle device."""
        sync(device)
        start = time.perf_counter()
        step_fn()
        sync(device)
        return time.perf_counter() - start

    def model_only_median():
        return statistics.median(synced_seconds(real_step_without_method) for _ in range(args.steps))

    def host_probe():
        """Two host costs of this process, beside the model-only step: microseconds per launch of a tiny op (the
        launch path: dispatch, autograd off, the CUDA launch call) and per iteration of a pure-Python loop
        (the interpreter alone). Timed at the same two points: if the process slows after compiling, these say
        whether launches or Python got slower."""
        tiny = torch.zeros(1, device=device)
        sync(device)
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(2000):
                tiny.add_(1.0)
            launch_us = (time.perf_counter() - start) / 2000 * 1e6
        sync(device)
        table = {}
        start = time.perf_counter()
        for i in range(200_000):
            table[i & 255] = i
        python_us = (time.perf_counter() - start) / 200_000 * 1e6
        return launch_us, python_us

    for _ in range(args.warmup):
        real_step_without_method()
    model_only_before = model_only_median()
    host_before = host_probe()

    # sync counting (GPU): warnings from set_sync_debug_mode during the real steps
    for _ in range(args.warmup):
        real_step()
    probe("warm-up")
    sync(device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    totals, cpu_totals, enqueues = [], [], []
    syncs = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_gpu:
            torch.cuda.set_sync_debug_mode("warn")
        for _ in range(args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            real_step()
            enqueues.append(time.perf_counter() - start)  # the host's part: on a GPU, until all is queued
            if on_gpu:
                torch.cuda.set_sync_debug_mode(0)
            sync(device)  # the timing sync, outside the counted region
            if on_gpu:
                torch.cuda.set_sync_debug_mode("warn")
            totals.append(time.perf_counter() - start)
            cpu_totals.append(time.process_time() - cpu_start)
        if on_gpu:
            torch.cuda.set_sync_debug_mode(0)
            sync_warnings = [w for w in caught if "synchroniz" in str(w.message).lower()
                             and "prototype" not in str(w.message).lower()]
            syncs = len(sync_warnings) / args.steps
            for where, count in collections.Counter(f"{w.filename}:{w.lineno}" for w in sync_warnings).items():
                print(f"host-device sync at {where}: {count} times in {args.steps} steps")
    probe("timed real steps")
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)

    # the marginal cost: steps with and without the method interleaved (alternating which comes first), so that a
    # drift of the machine's speed during the run (seen on lent GPUs: 40 % between calls) falls on both alike
    with_method, without_method = [], []
    for _ in range(args.warmup):
        real_step_without_method()
    for i in range(args.steps):
        pair = ((real_step, with_method), (real_step_without_method, without_method))
        for step_fn, out in (pair if i % 2 == 0 else pair[::-1]):
            out.append(synced_seconds(step_fn))
    with_median, without_median = statistics.median(with_method), statistics.median(without_method)
    pair_margins = sorted(1 - b / a for a, b in zip(with_method, without_method))

    probe("interleaved steps")
    times: dict = {}
    for _ in range(args.warmup):
        timed_step({})
    for _ in range(args.steps):
        timed_step(times)

    probe("breakdown steps")
    model_only_after = model_only_median()
    host_after = host_probe()
    # after every timed step (a CUDA profile can leave CUPTI attached to the process, which slows every later
    # launch: see probe) and before the FLOP count (after which torch < 2.13 runs a compiled model eager for good)
    step_profile = (profile_one_step(lambda: (real_step(), sync(device)), on_gpu, args.profile_step)
                    if args.profile_step else None)

    # model FLOPs of one real step (teacher forwards + student forward/backward + method), counted by torch, last,
    # and with the method eager: dynamo skips a compiled function called under a dispatch mode such as
    # FlopCounterMode, and torch before 2.13 (pytorch#186085) then runs it eager for good (on the H100's torch 2.11
    # every later step of this benchmark ran the "compiled" method eager)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        real_step(dataclasses.replace(sc, compile_method=False))
    sync(device)
    step_flops = counter.get_total_flops()
    probe("FLOP count (method eager)")
    matmul_peak = measured_matmul_peak(device, args.precision) if on_gpu else None
    probe("matmul peak", cuda_activity=True)
    if args.profile_method:
        from torch.profiler import profile

        prof = profile()
        timed_step({}, method_ctx=lambda: prof)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    median = {name: statistics.median(times[name]) for name in PARTS}
    parts_sum = sum(median.values())
    total = statistics.median(totals)
    images = 2 * args.batch
    where = (f"{torch.cuda.get_device_name(device)}, cudnn.benchmark {torch.backends.cudnn.benchmark}" if on_gpu
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"U2PL step breakdown: {backbone}, crop {crop}, {args.batch} + {args.batch} images, {num_classes} classes, "
          f"{args.precision}, {'channels-last' if args.channels_last else 'contiguous'}, data {args.data}, {where}, "
          f"method {f'compiled ({args.compile_method})' if args.compile_method else 'eager'}, "
          f"model {f'compiled ({args.compile_model})' if args.compile_model else 'eager'}, "
          f"optimiser {describe_optimizer(optimizer)}; "
          f"median of {args.steps} steps; THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} load average {os.getloadavg()[0]:.1f}")
    print()
    print("| part | ms | % of parts |")
    print("| --- | --- | --- |")
    for name in PARTS:
        print(f"| {name} | {1000 * median[name]:.1f} | {100 * median[name] / parts_sum:.1f} |")
    print(f"| sum of parts (breakdown mode, synced between parts) | {1000 * parts_sum:.1f} | 100.0 |")
    print(f"| real step (Trainer.train_step, no inner syncs) | {1000 * total:.1f} | |")
    print(f"| real step, interleaved with the next row | {1000 * with_median:.1f} | |")
    print(f"| real step without the method work, interleaved | {1000 * without_median:.1f} | |")
    print(f"| step without the method work, before any step with it (first timed phase) | "
          f"{1000 * model_only_before:.1f} | |")
    print(f"| step without the method work, after the breakdown steps | {1000 * model_only_after:.1f} | |")
    print(f"| host: us per tiny-op launch, before / after (as the two rows above) | "
          f"{host_before[0]:.2f} / {host_after[0]:.2f} | |")
    print(f"| host: us per pure-Python loop iteration, before / after | "
          f"{host_before[1]:.3f} / {host_after[1]:.3f} | |")
    print()
    print("| metric | value |")
    print("| --- | --- |")
    print(f"| method work, % of step (breakdown, synced parts) | {100 * median['method work'] / parts_sum:.1f} |")
    print(f"| method work, marginal % of the real step (1 - without / with, interleaved medians) | "
          f"{100 * (1 - without_median / with_median):.1f} |")
    print(f"| the same per interleaved pair: median (min .. max) | {100 * statistics.median(pair_margins):.1f} "
          f"({100 * pair_margins[0]:.1f} .. {100 * pair_margins[-1]:.1f}) |")
    print(f"| images/s (real step) | {images / total:.2f} |")
    print(f"| process CPU s per real step | {statistics.median(cpu_totals):.3f} |")
    if on_gpu:  # near the step's wall time: the host's launches, not the GPU, set the pace (launch-bound)
        print(f"| host s to queue a real step (before its final sync) | {statistics.median(enqueues):.3f} |")
    print(f"| peak memory | {peak:.2f} GiB ({'max_memory_allocated' if on_gpu else 'ru_maxrss, whole process'}) |")
    achieved = step_flops / total
    print(f"| model GFLOP per real step (torch.utils.flop_counter) | {step_flops / 1e9:.1f} |")
    print(f"| achieved TFLOP/s | {achieved / 1e12:.1f} |")
    if on_gpu:
        print(f"| host-device syncs per real step | {syncs:g} |")
        kind = f"{args.precision}{' (TF32, as the convolutions)' if args.precision == 'fp32' else ''}"
        print(f"| measured {kind} matmul peak (8192^3) | {matmul_peak / 1e12:.0f} TFLOP/s |")
        print(f"| MFU vs measured {args.precision} matmul peak | {100 * achieved / matmul_peak:.1f} % |")
        print(f"| MFU vs H100 SXM dense bf16 datasheet (989 TFLOP/s) | {100 * achieved / 989e12:.1f} % |")
    if probes:
        print()
        print("| compiled method, one probed real step (autograd graph; last row on a GPU: CUDA profile) | "
              "compiled or captured regions | CUDA graph launches | eager _AnchorLoss nodes |")
        print("| --- | --- | --- | --- |")
        print("\n".join(probes))
    if step_profile:
        print()
        print(step_profile)


if __name__ == "__main__":
    main()
