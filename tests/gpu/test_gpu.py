"""GPU-only paths: the sync-free queue push (fused and compacted) and the percentiles' Triton kernel, no host sync
inside the U2PL step (eager, and with the method compiled or captured by hand), a CUDA training run with bf16,
channels-last and torch.compile. Skipped without a CUDA device (this project's CI has none)."""
import contextlib
import json
from pathlib import Path

import pytest
import torch

from u2pl_scale import accel
from u2pl_scale.engine.step import StepConfig, method_runs_in_profile, run_method_losses, u2pl_step
from u2pl_scale.method.queues import ClassQueues
from u2pl_scale.model import build_model
from u2pl_scale.config import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("max_pairs", [None, 2000], ids=["fused-triton-push", "compacted-triton-row-copy"])
def test_static_queue_push_on_gpu_equals_the_cpu_push(max_pairs, monkeypatch):
    """Eager pushes with the CUDA stages run the fused Triton push (kernels.launch_triton_push); with max_pairs
    (2000 drops nothing here) the compacted push and its Triton row copy (kernels.launch_triton). Both must have
    run, with no fallback to torch ops (which would pass the comparison too)."""
    from u2pl_scale.accel import triton_kernels as kernels

    name = "launch_triton_push" if max_pairs is None else "launch_triton"
    launches, launch = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a: (launches.append(1), launch(*a))[1])
    g = torch.Generator().manual_seed(0)
    features = torch.randn(500, 8, generator=g)
    mask = torch.rand(500, 4, generator=g) < 0.3
    cpu = ClassQueues(4, 8, [50, 60, 70, 80], write=accel.select("cpu").queue_write)
    gpu = ClassQueues(4, 8, [50, 60, 70, 80], device="cuda", write=accel.select("cuda").queue_write)
    for _ in range(3):
        cpu.push(features, mask)
        gpu.push(features.cuda(), mask.cuda(), max_pairs=max_pairs)
    assert len(launches) == 3 and not kernels._triton_failed, kernels._triton_failed
    for key, value in cpu.state_dict().items():
        assert torch.equal(value, gpu.state_dict()[key].cpu()), key


def test_triton_percentiles_on_gpu_equal_the_torch_ops_and_numpy(monkeypatch):
    """The percentiles' Triton kernel (kernels.launch_triton_percentiles) as the eager method runs it on CUDA,
    against the torch ops on the same GPU and numpy.percentile; and no valid entry gives +inf."""
    import numpy as np

    from u2pl_scale.accel import triton_kernels as kernels
    from u2pl_scale.accel.cuda import percentiles_and_count as _percentiles_and_count

    g = torch.Generator().manual_seed(0)
    values = torch.rand(300001, generator=g) * 4
    valid = torch.rand(300001, generator=g) < 0.7
    qs = [80.0, 17.3456789, 82.6543211, 0.0]
    launches = []
    launch = kernels.launch_triton_percentiles
    monkeypatch.setattr(kernels, "launch_triton_percentiles", lambda *a: (launches.append(1), launch(*a))[1])
    fused, count = _percentiles_and_count(values.cuda(), valid.cuda(), qs)
    empty, _ = _percentiles_and_count(values.cuda(), torch.zeros_like(valid).cuda(), qs)
    assert len(launches) == 2 and not kernels._triton_failed
    monkeypatch.setattr(kernels, "_uses_triton", lambda tensor: False)
    torch_ops, _ = _percentiles_and_count(values.cuda(), valid.cuda(), qs)
    assert int(count) == int(valid.sum())
    torch.testing.assert_close(fused.cpu(), torch_ops.cpu(), rtol=1e-6, atol=1e-6)
    reference = torch.tensor(np.percentile(values[valid].double().numpy(), qs))
    torch.testing.assert_close(fused.cpu().double(), reference, rtol=1e-6, atol=1e-6)
    assert torch.isinf(empty).all()


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead"],
                         ids=["eager", "compiled-method", "compiled-method-cuda-graphs"])
def test_u2pl_step_does_not_synchronise_with_the_host(mode):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["method.contrastive.queue_size=2000",
                                                       f"train.compile_method={str(mode is not None).lower()}",
                                                       f"train.compile_method_mode={mode or 'default'}"])
    device = torch.device("cuda")
    student = build_model(cfg.model, 6).to(device).to(memory_format=torch.channels_last)
    teacher = build_model(cfg.model, 6).to(device).to(memory_format=torch.channels_last)
    stages = accel.select(device, compiled=mode is not None)
    queues = ClassQueues(6, cfg.model.rep_dim, 2000, device=device, write=stages.queue_write)
    sc = StepConfig.from_config(cfg, stages)
    x_l = torch.randn(2, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    x_u = torch.randn(2, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    y_l = torch.randint(0, 6, (2, 64, 64), device=device)
    valid = torch.ones(2, 64, 64, dtype=torch.bool, device=device)
    ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    for progress in (0.1, 0.2):  # warm-up: compiles; with CUDA graphs a warm-up run, then the graphs' recording
        u2pl_step(sc, student, teacher, queues, x_l, y_l, x_u, valid, progress, ctx)["loss"].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = u2pl_step(sc, student, teacher, queues, x_l, y_l, x_u, valid, 0.3, ctx)  # new progress, same graph
        terms["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(terms["loss"]).item()


def test_method_replayed_as_cuda_graphs_reads_each_steps_inputs_and_updates_the_queues():
    """compile_method_mode=reduce-overhead against the same compiled method without CUDA graphs, over three steps
    with new inputs each (the third is a replay of the recorded graphs): the sampling-free parts agree (the
    unsupervised loss, its gradient, the reliable ratio, the queue pointers and fill); the contrastive loss is
    finite and positive. The same queues feed both, copied before each step."""
    from method_inputs import make_inputs, step_config

    stages = accel.select("cuda", compiled=True)
    sc_graphs, sc_plain = step_config(stages), step_config(stages)
    sc_graphs.compile_method_mode, sc_plain.compile_method_mode = "reduce-overhead", "default"
    queues = {"graphs": None, "plain": None}
    for step, progress in enumerate((0.1, 0.5, 0.9)):
        inputs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in make_inputs(step, 0)]
        cpu_queues = inputs[-1]
        results, launches = {}, {}
        for name, sc in (("graphs", sc_graphs), ("plain", sc_plain)):
            if queues[name] is None:
                queues[name] = ClassQueues(cpu_queues.num_classes, cpu_queues.dim, cpu_queues.capacity_list,
                                           device="cuda", write=stages.queue_write)
                queues[name].load_state_dict({k: v.cuda() for k, v in cpu_queues.state_dict().items()})
            pred = inputs[0].detach().clone().requires_grad_()
            rep = inputs[1].detach().clone().requires_grad_()
            # the last step profiled (a replay; recording is left unprofiled)
            prof = torch.profiler.profile() if step == 2 else None
            with prof or contextlib.nullcontext():
                unsup, contra, reliable = run_method_losses(sc, pred, rep, *inputs[2:7], queues[name], progress)
                (unsup + contra).backward()
                torch.cuda.synchronize()
            if prof is not None:
                runs = method_runs_in_profile(prof)
                # the compiled code ran, not the eager method (whose contrastive loss is an autograd.Function)
                assert runs["compiled"] > 0, f"{name} ran eager"
                assert runs["eager"] == 0, f"{name} ran the eager contrastive loss"
                launches[name] = runs["graph_launches"]
            results[name] = dict(unsup=unsup.detach(), contra=contra.detach(), reliable=reliable.detach(),
                                 grad_pred=pred.grad, write_ptr=queues[name].write_ptr.clone(),
                                 fill=queues[name].fill.clone())
        if launches:  # the third call replays the recorded forward and backward graphs; without them, none
            assert launches["plain"] == 0 and launches["graphs"] >= 2, launches
        graphs, plain = results["graphs"], results["plain"]
        for key in ("unsup", "reliable", "grad_pred"):
            torch.testing.assert_close(graphs[key], plain[key], rtol=1e-5, atol=1e-6, msg=f"step {step}: {key}")
        for key in ("write_ptr", "fill"):
            assert torch.equal(graphs[key], plain[key]), f"step {step}: {key}"
        assert torch.isfinite(graphs["contra"]) and graphs["contra"] > 0


CUDA_EAGER = accel.select("cuda") if torch.cuda.is_available() else None  # the stages an eager (or captured) step takes


def _captured_against_eager(runs: dict, check_profile=None) -> None:
    """runs = {"graph": fn, "eager": fn}, fn(inputs, queues, progress) -> (unsup, contra, reliable ratio): three
    steps with new inputs each and the same seeds, each on its own CUDA copy of test_graphed_method's queues.
    Losses, gradients and queues equal; the graph's steps after the capturing one do not synchronise with the host;
    `check_profile(prof)` checks a profile of the graph's last step, if given."""
    from method_inputs import big_queues, make_inputs

    template = big_queues()
    queues = {}
    for name in runs:
        queues[name] = ClassQueues(template.num_classes, template.dim, template.capacity_list, device="cuda",
                                   write=CUDA_EAGER.queue_write)
        queues[name].load_state_dict({k: v.cuda() for k, v in template.state_dict().items()})
    for step, progress in enumerate((0.1, 0.5, 0.9)):
        inputs = [t.cuda() for t in make_inputs(step, 0)[:7]]
        results = {}
        for name, run in runs.items():
            pred = inputs[0].detach().clone().requires_grad_()
            rep = inputs[1].detach().clone().requires_grad_()
            torch.manual_seed(100 + step)
            prof = torch.profiler.profile() if check_profile and step == 2 and name == "graph" else None
            if step > 0 and name == "graph":
                torch.cuda.set_sync_debug_mode("error")
            try:
                with prof or contextlib.nullcontext():
                    unsup, contra, reliable = run((pred, rep, *inputs[2:]), queues[name], progress)
                    (2.0 * unsup + 0.5 * contra).backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            if prof is not None:
                check_profile(prof)
            results[name] = dict(unsup=unsup.detach(), contra=contra.detach(), reliable=reliable.detach(),
                                 grad_pred=pred.grad, grad_rep=rep.grad, buffer=queues[name].buffer.clone(),
                                 write_ptr=queues[name].write_ptr.clone(), fill=queues[name].fill.clone())
        for key in ("unsup", "reliable", "grad_pred", "write_ptr", "fill", "contra", "grad_rep", "buffer"):
            torch.testing.assert_close(results["graph"][key], results["eager"][key], rtol=1e-5, atol=1e-6,
                                       msg=f"step {step}: {key}")


def test_method_captured_by_hand_replays_the_eager_method():
    """compile_method_mode=cuda-graph (engine/graphed.py) against the eager method over three steps with new inputs
    each and the same seeds (the first captures, after two warm-up runs it undoes): losses, gradients and queues
    equal, the contrastive loss too (a captured graph draws from the default generator as the eager ops do); the
    replayed steps do not synchronise with the host and launch the graphs, not the eager ops."""
    from method_inputs import step_config

    sc_graph, sc_eager = step_config(CUDA_EAGER), step_config(CUDA_EAGER)
    sc_graph.compile_method_mode, sc_eager.compile_method = "cuda-graph", False

    def check_profile(prof):
        runs = method_runs_in_profile(prof)
        assert runs["graph_launches"] >= 2 and runs["eager"] == 0 and runs["compiled"] == 0, runs

    _captured_against_eager(
        {name: (lambda inputs, queues, progress, sc=sc: run_method_losses(sc, *inputs, queues, progress))
         for name, sc in (("graph", sc_graph), ("eager", sc_eager))}, check_profile)


def test_method_captured_by_hand_in_two_graphs_around_the_gather_replays_the_eager_method():
    """The world-size > 1 form of compile_method_mode=cuda-graph (two forward graphs, the queues' gather eager
    between them, one backward graph) on one GPU, with a gather that plays a second rank sending the same rows:
    equal to the eager method pushing the same rows over three steps; replays do not synchronise with the host."""
    from method_inputs import eager_with_duplicated_push, split_parts, step_config
    from u2pl_scale.engine.graphed import GraphCache
    from u2pl_scale.engine.step import method_losses

    sc = step_config(CUDA_EAGER)
    cache = GraphCache(method_losses, parts=split_parts(), world=2)
    _captured_against_eager({"graph": lambda inputs, queues, progress: cache(sc, inputs, queues, progress),
                             "eager": eager_with_duplicated_push(sc)})
    (graphed,) = cache.graphs.values()
    assert graphed.split and len(graphed.stages) == 2


@pytest.mark.slow
@pytest.mark.parametrize("model_mode, method_compiled, method_mode",
                         [(None, False, "reduce-overhead"), (None, True, "cuda-graph"),
                          (None, True, "reduce-overhead"), ("default", True, "reduce-overhead"),
                          ("reduce-overhead", True, "reduce-overhead")],
                         ids=["eager", "method-captured", "method-compiled", "all-compiled", "all-graphs"])
def test_cuda_training_run_bf16_channels_last(demo_shards, tmp_path, model_mode, method_compiled, method_mode):
    """A short CUDA training run: eager; with the method captured by hand as CUDA graphs (no compiling); with the
    method compiled (CUDA graphs, the default mode; about a minute of compiling); with the student and teacher
    compiled too (several minutes of compiling), and the same with the model replayed as CUDA graphs (each step
    marked once by the model, evaluation eager)."""
    from u2pl_scale.engine.trainer import train
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        "train.device=cuda", "train.precision=bf16", "train.channels_last=true",
        f"train.compile={str(model_mode is not None).lower()}", f"train.compile_mode={model_mode or 'default'}",
        f"train.compile_method={str(method_compiled).lower()}",
        f"train.compile_method_mode={method_mode}",
        "train.progress_bar=false", "data.steps_per_epoch=4", "train.epochs=2",
        f"train.run_dir={tmp_path}"])
    summary = train(cfg)
    assert summary["steps"] == 8 and summary["evaluated_model"] == "teacher"
    assert json.loads((tmp_path / "summary.json").read_text())["miou"] is not None
