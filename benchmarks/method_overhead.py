"""Time the U2PL method work of one training step alone (U2PL_SPEC.md section 10).

Measured: entropy + one sort for the three percentiles (drop / low / high), reliable pseudo-labels, the
unsupervised loss at crop size, feature-level labels/masks, the contrastive loss with its masks, the queue push
(through the distributed call path; world size 1 here) and sampling, and the backward of unsup + contrastive.
Not measured: model forwards, the upsampling of logits, the supervised loss.

Inputs are fixed random tensors at the published shapes, features channels-last (as the engine runs), queues
pre-filled to capacity. Usage:
    python benchmarks/method_overhead.py [--shape voc|cityscapes|voc_vit|cityscapes_vit] [--device cpu|cuda]
                                         [--threads 2] [--steps 10] [--warmup 3] [--queue-dtype float32|bfloat16]
                                         [--compile [MODE]]
                                         [--implementation auto|reference]
    python benchmarks/method_overhead.py --count-ops [--shape voc]   # the reference stages' ops per step
    python benchmarks/method_overhead.py --host-cost   # the reference stages' host time per step (tiny, CPU)
    python benchmarks/method_overhead.py --stages [--shape voc]   # the eager step's parts, each timed

CPU threads: every multi-threaded op ends at a barrier. On a machine shared with other jobs (load above the core
count) a descheduled OpenMP worker makes each barrier cost up to a scheduler time slice, so 2 threads can be
several times slower than 1. OMP_WAIT_POLICY=PASSIVE (set here unless already set; libgomp reads it once, when
torch loads) makes waiting workers sleep instead of spin. OMP_WAIT_POLICY=default measures libgomp's default
(spin a while, then sleep), ACTIVE always spins. The printed process CPU time (all threads, spinning included)
is the number to compare across runs on a shared machine.

The method runs with the stages the trainer would pick for the device (u2pl_scale.accel.select: on CPU the CPU
stages, on CUDA the Triton ones); `--implementation reference` times u2pl_scale/method's own stages instead.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

# Large fresh CPU allocations page-fault on every step; transparent huge pages make that several times cheaper.
# Read once by torch at its first allocation; run with THP_MEM_ALLOC_ENABLE=0 to measure without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ["OMP_WAIT_POLICY"].lower() == "default":  # measure libgomp's default (spin a while, then sleep)
    del os.environ["OMP_WAIT_POLICY"]

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from u2pl_scale.method import (
    ClassQueues,
    alpha_t,
    contrastive_inputs,
    contrastive_loss,
    drop_percent,
    reliability,
    unsup_loss_from_reliable,
)
from u2pl_scale import accel  # noqa: E402
from u2pl_scale.config import COMPILE_METHOD_MODES  # noqa: E402
from u2pl_scale.engine.step import begin_graph_step, progress_tensor  # noqa: E402

SHAPES = {
    # name: (labeled, unlabeled, crop, feature size, classes, capacities)
    "voc": (2, 2, 513, 129, 21, [50000] + [30000] * 20),
    "cityscapes": (2, 2, 769, 193, 19, [30000] * 19),
    # the ViT configs' crops (patch 14: 518 VOC, 798 Cityscapes); their decoders give ceil(crop / 4) features
    "voc_vit": (2, 2, 518, 130, 21, [50000] + [30000] * 20),
    "cityscapes_vit": (2, 2, 798, 200, 19, [30000] * 19),
}
# --host-cost: VOC's classes and batch with every size small, so that each op's kernel costs next to nothing and
# what is timed is the host's work per op (dispatch, autograd, Python). Feature dim, anchors and negatives:
HOST_COST_SHAPE = (2, 2, 9, 3, 21, [64] * 21)
HOST_COST_DIM = 8
HOST_COST_CONTRASTIVE = dict(num_anchors=4, num_negatives=2)


def make_inputs(shape: str, device: torch.device, queue_dtype: torch.dtype, seed: int = 0, dim: int = 256,
                contrastive: dict | None = None, stages=None):
    stages = stages if stages is not None else accel.select(device)
    num_l, num_u, crop, feat, num_classes, capacities = SHAPES[shape] if isinstance(shape, str) else shape
    gen = torch.Generator().manual_seed(seed)
    teacher_logits_u = (3 * torch.randn(num_u, num_classes, crop, crop, generator=gen)).to(device)
    student_logits_u = torch.randn(num_u, num_classes, crop, crop, generator=gen).to(device).requires_grad_()
    pseudo_u = teacher_logits_u.argmax(1)  # stands in for the first (eval-mode) teacher forward
    labels_l = torch.randint(0, num_classes, (num_l, crop, crop), generator=gen)
    labels_l[:, :20] = 255
    labels_l = labels_l.to(device)
    rep = torch.randn(num_l + num_u, dim, feat, feat, generator=gen).to(device)
    rep = rep.contiguous(memory_format=torch.channels_last).requires_grad_()
    rep_teacher = torch.randn(num_l + num_u, dim, feat, feat, generator=gen).to(device)
    rep_teacher = rep_teacher.contiguous(memory_format=torch.channels_last)
    prob_teacher = torch.softmax(3 * torch.randn(num_l + num_u, num_classes, feat, feat, generator=gen), 1).to(device)
    queues = ClassQueues(num_classes, dim, capacities, device=device, dtype=queue_dtype, write=stages.queue_write)
    queues.buffer.copy_(torch.nn.functional.normalize(torch.randn(queues.buffer.shape, generator=gen), dim=1))
    queues.fill.copy_(queues.capacities)
    queues.write_ptr.copy_(torch.randint(0, 1000, (num_classes,), generator=gen) % torch.tensor(capacities))
    return dict(teacher_logits_u=teacher_logits_u, student_logits_u=student_logits_u, pseudo_u=pseudo_u,
                labels_l=labels_l, rep=rep, rep_teacher=rep_teacher, prob_teacher=prob_teacher, queues=queues,
                num_labeled=num_l, feature_size=(feat, feat), contrastive=contrastive or {}, stages=stages)


def method_forward(inputs: dict, progress, generator=None):
    # In a training step the student's logits and features are outputs of layers, whose backward consumes the
    # gradients the method returns; views of the leaves play that part here (free, and like a layer they take
    # the gradient as it is instead of copying it, which autograd does for a leaf when the tensor is shared).
    student_logits_u = inputs["student_logits_u"].view_as(inputs["student_logits_u"])
    rep = inputs["rep"].view_as(inputs["rep"])
    stages = inputs["stages"]
    rel = reliability(inputs["teacher_logits_u"], inputs["pseudo_u"], drop_percent(progress), alpha_t(progress),
                      stages=stages)
    unsup = unsup_loss_from_reliable(student_logits_u, rel.reliable_labels, rel.kept_count, rel.valid_count,
                                     stages=stages)
    labels, low, high = contrastive_inputs(inputs["labels_l"], inputs["pseudo_u"], rel.low_mask, rel.high_mask,
                                           inputs["feature_size"])
    contra = contrastive_loss(rep, inputs["rep_teacher"], inputs["prob_teacher"], labels, low, high,
                              inputs["num_labeled"], inputs["queues"], generator=generator, stages=stages,
                              **inputs["contrastive"])
    return unsup, contra.loss, rel.reliable_ratio


GRAPH_INPUTS = ("student_logits_u", "rep", "teacher_logits_u", "pseudo_u", "labels_l", "rep_teacher", "prob_teacher")


def graphed_forward(inputs: dict, recorder=None):
    """method_forward captured by hand as CUDA graphs (train.compile_method_mode=cuda-graph): the tensors the
    graphs read as static inputs (the first two get gradients), the rest of `inputs` fixed at capture."""
    from u2pl_scale.engine.graphed import CudaRecorder, GraphCache

    fixed = {k: v for k, v in inputs.items() if k not in GRAPH_INPUTS + ("queues", "stages")}

    stages = inputs["stages"]

    def method(fixed, *args):
        *tensors, queues, progress = args
        return method_forward(dict(fixed, queues=queues, stages=stages, **dict(zip(GRAPH_INPUTS, tensors))),
                              progress)

    cache = GraphCache(method, recorder or CudaRecorder)
    return lambda inputs, progress, generator: cache(fixed, tuple(inputs[k] for k in GRAPH_INPUTS),
                                                     inputs["queues"], progress, generator)


def method_step(inputs: dict, progress: float = 0.1, generator=None, forward=method_forward) -> dict:
    unsup, contra, ratio = forward(inputs, progress, generator)
    (unsup + contra).backward()
    return {"unsup": unsup, "contra": contra, "ratio": ratio}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# the method's parts as method_forward reaches them: this module's imported names, and contrastive_loss's three parts
_STAGES = (("reliability", None, "reliability"), ("unsupervised CE", None, "unsup_loss_from_reliable"),
           ("feature-level inputs", None, "contrastive_inputs"), ("contrastive prepare", "contrastive",
           "contrastive_prepare"), ("queue push", "contrastive", "push_prepared"),
           ("contrastive finish", "contrastive", "contrastive_finish"))


@contextlib.contextmanager
def stage_timers(device: torch.device, times: dict):
    """Within this block method_forward's parts append their wall times (synced on a GPU) to times[stage], by
    wrapping the functions it calls; restored on exit."""
    import importlib

    patched = []
    for stage, module_name, attribute in _STAGES:
        module = importlib.import_module(f"u2pl_scale.method.{module_name}") if module_name else sys.modules[__name__]
        function = getattr(module, attribute)

        def timed(*args, _function=function, _stage=stage, **kwargs):
            sync(device)
            start = time.perf_counter()
            result = _function(*args, **kwargs)
            sync(device)
            times[_stage].append(time.perf_counter() - start)
            return result

        patched.append((module, attribute, function))
        setattr(module, attribute, timed)
    try:
        yield
    finally:
        for module, attribute, function in patched:
            setattr(module, attribute, function)


def print_stages(inputs: dict, device: torch.device, steps: int, warmup: int, generator) -> None:
    """--stages: the eager method step split into its parts and the backward, medians over `steps` steps."""
    times = collections.defaultdict(list)
    with stage_timers(device, times):
        for _ in range(warmup + steps):
            inputs["student_logits_u"].grad = inputs["rep"].grad = None
            sync(device)
            start = time.perf_counter()
            unsup, contra, _ = method_forward(inputs, 0.1, generator)
            sync(device)
            middle = time.perf_counter()
            (unsup + contra).backward()
            sync(device)
            times["backward"].append(time.perf_counter() - middle)
            times["whole step"].append(time.perf_counter() - start)
    whole = statistics.median(times["whole step"][warmup:])
    print("| stage | median ms | min ms | % of the step (medians) |")
    print("| --- | --- | --- | --- |")
    for stage, values in times.items():
        values = values[warmup:]
        print(f"| {stage} | {1e3 * statistics.median(values):.3f} | {1e3 * min(values):.3f} | "
              f"{100 * statistics.median(values) / whole:.0f} |")


# ops that launch no kernel: allocations, and the bookkeeping around them
_NO_KERNEL = {"empty", "empty_strided", "detach", "lift_fresh", "scalar_tensor", "_local_scalar_dense"}


class _OpCounter(TorchDispatchMode):
    """A dispatch mode counting the kernel-launching aten ops (not views, not allocations) by calling function."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name.split("::")[-1] not in _NO_KERNEL:
            frames = [f for f in traceback.extract_stack() if "u2pl_scale" in f.filename]
            where = (f"{frames[-1].filename.split('u2pl_scale/')[-1]} {frames[-1].name}" if frames
                     else "autograd backward of built-in ops")
            self.where[where] += 1
        return func(*args, **(kwargs or {}))


def _count_with_triton(shape: str) -> int:
    """The step's ops as a CUDA device with Triton issues them (the CUDA stages): the queue push then runs as two
    Triton kernels (launch_triton_push) and the percentiles as one (launch_triton_percentiles), which the meta
    device cannot run; here each kernel counts as one op (the push writes nothing, the percentiles are empty)."""
    from u2pl_scale.accel import triton_kernels as kernels
    from u2pl_scale.accel.cuda import cuda_stages

    def push(*args):
        counter.where["accel/triton_kernels.py launch_triton_push (2 Triton kernels)"] += 2

    def percentiles(sorted_values, count, fractions):
        counter.where["accel/triton_kernels.py launch_triton_percentiles (1 Triton kernel)"] += 1
        return torch.empty(len(fractions), device=sorted_values.device)

    saved = kernels._uses_triton, kernels.launch_triton_push, kernels.launch_triton_percentiles
    kernels._uses_triton, kernels.launch_triton_push, kernels.launch_triton_percentiles = (
        lambda tensor: True), push, percentiles
    try:
        inputs = make_inputs(shape, torch.device("meta"), torch.float32, stages=cuda_stages(compiled=False))
        with _OpCounter() as counter:
            method_step(inputs, 0.1, None)
    finally:
        kernels._uses_triton, kernels.launch_triton_push, kernels.launch_triton_percentiles = saved
    return sum(counter.where.values())


def count_ops(shape: str) -> None:
    """The kernel-launching aten ops of one eager step of the reference stages (forward and backward), by function.

    Runs on the "meta" device (no data). Views and allocations are not counted; an op that launches several kernels
    (a sort, a scan) counts once."""
    inputs = make_inputs(shape, torch.device("meta"), torch.float32)
    with _OpCounter() as counter:
        method_step(inputs, 0.1, None)
    triton_ops = _count_with_triton(shape)
    print("| shape | reference stages' ops per step (forward + backward, meta device) |")
    print("| --- | --- |")
    print(f"| {shape} | {sum(counter.where.values())} |")
    print(f"| {shape}, CUDA with Triton (the queue push's and percentiles' kernels counted as ops) | {triton_ops} |")
    print()
    print("| ops | where |")
    print("| --- | --- |")
    for where, count in counter.where.most_common(15):
        print(f"| {count} | {where} |")


def host_cost(steps: int, warmup: int) -> None:
    """Host time per eager step of the reference stages (which a GPU runs, but for two Triton kernels), on CPU with
    one thread at tiny shapes (HOST_COST_SHAPE), where kernels cost next to nothing: the time is the host's work to
    issue the step's ops (Python, autograd, dispatch), which on a GPU whose host launches slower than the GPU runs is
    the eager method's cost in the step. A GPU host adds its kernel-launch calls (a few us per op) on top. The CPU
    stages at the same shapes are printed beside it."""
    torch.set_num_threads(1)
    rows = []
    for path in ("reference", "cpu"):
        inputs = make_inputs(HOST_COST_SHAPE, torch.device("cpu"), torch.float32, dim=HOST_COST_DIM,
                             contrastive=HOST_COST_CONTRASTIVE,
                             stages=accel.select("cpu", implementation="auto" if path == "cpu" else "reference"))
        generator = torch.Generator().manual_seed(1)
        times = []
        for step in range(warmup + steps):
            inputs["student_logits_u"].grad = inputs["rep"].grad = None
            start = time.perf_counter()
            method_step(inputs, 0.1, generator)
            if step >= warmup:
                times.append(time.perf_counter() - start)
        inputs["student_logits_u"].grad = inputs["rep"].grad = None
        with _OpCounter() as counter:  # one more step, counted
            method_step(inputs, 0.1, generator)
        rows.append((path, sum(counter.where.values()), sorted(times)))
    print("| path | ops per step | host ms per step (median) | min ms | p90 ms |")
    print("| --- | --- | --- | --- | --- |")
    for path, ops, times in rows:
        p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
        print(f"| {path} | {ops} | {1e3 * statistics.median(times):.2f} | {1e3 * times[0]:.2f} | {1e3 * p90:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="voc")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--queue-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the reference stages' kernel-launching ops of one step (on the meta device, so on "
                             "any machine): on a GPU whose host launches slower than the GPU runs, each costs "
                             "launch time in eager mode")
    parser.add_argument("--compile", nargs="?", const="reduce-overhead", default=None,
                        choices=COMPILE_METHOD_MODES,
                        help="the forward under torch.compile with this mode (default: reduce-overhead, CUDA graphs "
                             "on a GPU), as train.compile_method runs it (the reference stages on every device; "
                             "compiled during warm-up; its sampling draws from torch's global RNG)")
    parser.add_argument("--stages", action="store_true",
                        help="time the eager step's parts (reliability, unsupervised CE, feature-level inputs, "
                             "contrastive prepare, queue push, contrastive finish, backward) instead of the whole")
    parser.add_argument("--implementation", choices=accel.IMPLEMENTATIONS, default="auto",
                        help="the stages (train.method_implementation): auto, as the trainer picks them for the "
                             "device, or u2pl_scale/method's reference stages")
    parser.add_argument("--host-cost", action="store_true",
                        help="host time per eager step of the reference stages at tiny shapes on CPU (one thread): the "
                             "per-op host work an eager GPU step pays, measured without a GPU")
    args = parser.parse_args()

    if args.count_ops:
        count_ops(args.shape)
        return
    if args.host_cost:
        host_cost(max(args.steps, 200), args.warmup)
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    stages = accel.select(device, compiled=args.compile not in (None, "cuda-graph"), implementation=args.implementation)
    inputs = make_inputs(args.shape, device, getattr(torch, args.queue_dtype), stages=stages)
    generator = torch.Generator(device=device).manual_seed(1)
    step_kwargs = dict(generator=generator)
    if args.stages:
        print_stages(inputs, device, args.steps, args.warmup, generator)
        return
    if args.compile == "cuda-graph" and device.type != "cuda":
        parser.error("--compile cuda-graph needs --device cuda")
    if args.compile == "cuda-graph":  # captured by hand (engine/graphed.py), as run_method_losses runs it
        step_kwargs = dict(forward=graphed_forward(inputs))
    elif args.compile:  # as run_method_losses calls it
        torch.manual_seed(1)
        compiled = torch.compile(method_forward, dynamic=False, mode=args.compile)

        def forward(inputs, progress, generator):
            begin_graph_step(inputs["queues"], args.compile)
            return compiled(inputs, progress_tensor(progress, device), generator)

        step_kwargs = dict(forward=forward)
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        inputs["student_logits_u"].grad = None
        inputs["rep"].grad = None
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        method_step(inputs, **step_kwargs)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            method_step(inputs, **step_kwargs)
        sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=30))
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} load average {os.getloadavg()[0]:.1f} "
          f"stages {stages.name}")
    print("| shape | device | queue dtype | mode | steps | timer | median s | min s | max s | p90 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, values in (("wall", times), ("process CPU", cpu_times)):
        values = sorted(values)
        p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
        print(f"| {args.shape} | {device.type} ({threads}) | {args.queue_dtype} | "
              f"{f'compiled ({args.compile})' if args.compile else 'eager'} | {len(values)} | {name} | "
              f"{statistics.median(values):.3f} | {values[0]:.3f} | {values[-1]:.3f} | {p90:.3f} |")

if __name__ == "__main__":
    main()
