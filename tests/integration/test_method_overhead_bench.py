"""benchmarks/method_overhead.py's GPU-free measures of the eager reference stages: their op count on the meta
device (--count-ops) and their host time on CPU (--host-cost, which runs the reference stages there). The two run
the method on different devices and count independently: equal counts show that the CPU run takes the path a GPU
takes (but for its Triton kernels), op for op."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "method_overhead.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_host_cost_runs_the_reference_stages_op_for_op():
    meta = run("--count-ops")
    meta_ops = int(re.search(r"^\| voc \| (\d+) \|$", meta, re.M).group(1))
    host_cost = run("--host-cost", "--steps", "20", "--warmup", "2")
    rows = dict(re.findall(r"^\| (reference|cpu) \| (\d+) \| [\d.]+ \|", host_cost, re.M))
    assert int(rows["reference"]) == meta_ops
    assert int(rows["cpu"]) != meta_ops  # the CPU stages are a different sequence of ops
    assert 100 < meta_ops < 400


def test_the_benchmarks_hand_captured_method_replays_the_eager_one():
    """`--compile cuda-graph` (GPU only) wraps the benchmark's method in engine/graphed.py's cache; with the CPU
    stand-in for the graphs, three steps agree with the eager method's losses, gradients and queue pointers."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import method_overhead as mo
    from u2pl_scale.engine.graphed import RerunRecorder
    from u2pl_scale.method.stages import REFERENCE

    results = {}
    for name in ("eager", "graphed"):
        inputs = mo.make_inputs(mo.HOST_COST_SHAPE, torch.device("cpu"), torch.float32, dim=mo.HOST_COST_DIM,
                                contrastive=mo.HOST_COST_CONTRASTIVE, stages=REFERENCE)
        forward = mo.graphed_forward(inputs, RerunRecorder) if name == "graphed" else mo.method_forward
        steps = []
        for step in range(3):
            inputs["student_logits_u"].grad = inputs["rep"].grad = None
            torch.manual_seed(step)
            out = mo.method_step(inputs, 0.1 + 0.3 * step, forward=forward)
            steps.append([out["unsup"].detach(), out["contra"].detach(), inputs["student_logits_u"].grad.clone(),
                          inputs["rep"].grad.clone(), inputs["queues"].write_ptr.clone()])
        results[name] = steps
    for eager, graphed in zip(results["eager"], results["graphed"]):
        for e, g in zip(eager, graphed):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_stages_time_every_part_of_the_method_and_restore_it(capsys):
    """`--stages` wraps the method's parts in timers: every part gets a row (a part the wrappers missed would have
    none), and the functions are the originals again afterwards."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import method_overhead as mo
    from u2pl_scale.method import contrastive

    originals = [getattr(mo, "reliability"), getattr(contrastive, "push_prepared")]
    inputs = mo.make_inputs(mo.HOST_COST_SHAPE, torch.device("cpu"), torch.float32, dim=mo.HOST_COST_DIM,
                            contrastive=mo.HOST_COST_CONTRASTIVE)
    mo.print_stages(inputs, torch.device("cpu"), steps=3, warmup=1, generator=torch.Generator().manual_seed(0))
    rows = dict(re.findall(r"^\| ([a-zA-Z -]+) \| ([\d.]+) \|", capsys.readouterr().out, re.M))
    parts = [stage for stage, _, _ in mo._STAGES] + ["backward"]
    assert sorted(rows) == sorted(parts + ["whole step"])
    assert all(float(value) > 0 for value in rows.values())
    assert [getattr(mo, "reliability"), getattr(contrastive, "push_prepared")] == originals
