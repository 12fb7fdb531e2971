"""train.compile_method_mode=cuda-graph (engine/graphed.py) without a GPU: the capture itself needs CUDA
(tests/gpu/test_gpu.py runs it there); here the graphs are replaced by RerunRecorder, which runs the captured function
again at each replay, so everything around them runs as on a GPU: the static input copies, undoing the warm-up's queue
pushes and random draws, the autograd plumbing (gradients to the student's outputs), the cache of captures, and the
start checks."""
from __future__ import annotations

import pytest
import torch

from method_inputs import big_queues, eager_with_duplicated_push, make_inputs, split_parts, step_config
from u2pl_scale.config import ConfigError, load_config
from u2pl_scale.engine.graphed import GraphCache, RerunRecorder
from u2pl_scale.engine.step import check_method_mode, method_losses, method_runs_in_graph, run_method_losses

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def assert_same_step(eager: dict, graphed: dict, step) -> None:
    for key in ("unsup", "contra", "reliable", "grad_pred", "grad_rep", "buffer"):
        torch.testing.assert_close(graphed[key], eager[key], rtol=1e-6, atol=1e-7, msg=f"{step}: {key}")
    for key in ("write_ptr", "fill"):
        assert torch.equal(graphed[key], eager[key]), f"{step}: {key}"


def _step(fn, seed: int, queues, progress: float):
    """One method step on fresh inputs (seed) against the given queues; returns its results."""
    pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, _ = make_inputs(seed, 0)
    torch.manual_seed(100 + seed)
    unsup, contra, reliable = fn((pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t), queues, progress)
    runs = method_runs_in_graph(2.0 * unsup + 0.5 * contra)
    (2.0 * unsup + 0.5 * contra).backward()
    return dict(runs=runs, unsup=unsup.detach(), contra=contra.detach(), reliable=reliable.detach(),
                grad_pred=pred.grad, grad_rep=rep.grad, buffer=queues.buffer[:-1].clone(), write_ptr=queues.write_ptr.clone(),
                fill=queues.fill.clone())


def test_replayed_method_equals_the_eager_method_step_by_step():
    """Three steps with new inputs and progress each, the same seeds: losses, gradients (with loss weights, so the
    backward's incoming gradients matter) and queues equal to those of the eager reference stages, although
    capturing ran the method twice more (warm-up) on the first step's inputs."""
    sc = step_config()
    cache = GraphCache(method_losses, recorder=RerunRecorder)
    queues = {"eager": big_queues(), "graphed": big_queues()}
    runs = {
        "eager": lambda inputs, queues, progress: method_losses(sc, *inputs, queues, progress),
        "graphed": lambda inputs, queues, progress: cache(sc, inputs, queues, progress),
    }
    pointers = queues["eager"].write_ptr.clone()
    for seed, progress in ((0, 0.1), (1, 0.45), (2, 0.8)):
        results = {name: _step(fn, seed, queues[name], progress) for name, fn in runs.items()}
        eager, graphed = results["eager"], results["graphed"]
        assert_same_step(eager, graphed, seed)
        assert eager["contra"] > 0 and eager["grad_rep"].abs().sum() > 0
        assert not torch.equal(eager["write_ptr"], pointers), "nothing was pushed"
        # what the step benchmark's probes read: the replayed method, not the eager one
        assert graphed["runs"] == {"compiled": 0, "captured": 1, "eager": 0}, graphed["runs"]
        assert eager["runs"] == {"compiled": 0, "captured": 0, "eager": 1}, eager["runs"]
        pointers = eager["write_ptr"]
    assert cache.captures == 1  # one input signature


def test_a_new_input_signature_is_captured_anew_and_old_ones_are_kept():
    sc = step_config()
    cache = GraphCache(method_losses, recorder=RerunRecorder)
    queues = make_inputs(0, 0)[-1]
    for labeled, unlabeled in ((2, 2), (1, 2), (2, 2)):
        pred, rep, *rest, _ = make_inputs(0, 0, num_labeled=labeled, num_unlabeled=unlabeled)
        unsup, contra, _ = cache(sc, (pred, rep, *rest), queues, 0.3)
        (unsup + contra).backward()
        assert pred.grad.shape == pred.shape and rep.grad.shape == rep.shape
    assert cache.captures == 2 and len(cache.graphs) == 2


def test_the_replayed_outputs_are_copies_of_the_graphs_static_outputs():
    """A CUDA graph's static outputs are overwritten at each replay: callers get copies (logging reads them
    later), which share no memory with them."""
    sc = step_config()
    cache = GraphCache(method_losses, recorder=RerunRecorder)
    queues = make_inputs(0, 0)[-1]
    first = cache(sc, make_inputs(0, 0)[:7], queues, 0.2)
    (graphed,) = cache.graphs.values()
    static = graphed.stages[0].out
    assert all(t.untyped_storage().data_ptr() != s.untyped_storage().data_ptr() for t, s in zip(first, static))
    kept = [t.clone() for t in first]
    cache(sc, make_inputs(1, 0)[:7], queues, 0.2)
    for t, k in zip(first, kept):
        assert torch.equal(t, k)


def test_cuda_graph_mode_takes_no_generator_and_is_refused_off_cuda():
    sc = step_config()
    sc.compile_method_mode = "cuda-graph"
    with pytest.raises(ValueError, match="no generator"):
        run_method_losses(sc, *make_inputs(0, 0), 0.5, generator=torch.Generator())
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["train.compile_method=true", "train.compile_method_mode=cuda-graph"])
    with pytest.raises(ConfigError, match="needs a CUDA device, not cpu"):
        check_method_mode(cfg.train, torch.device("cpu"))
    check_method_mode(cfg.train, torch.device("cuda"))
    cfg.train.compile_method = False  # the mode alone changes nothing
    check_method_mode(cfg.train, torch.device("cpu"))


def _rank_worker(rank: int, port: int, out_dir: str):
    """One of two gloo ranks: three steps of the eager method and of the graphed one (CPU stand-in for the graphs),
    each on its own copy of the queues, the inputs different on each rank."""
    import os

    import torch.distributed as dist

    from u2pl_scale.engine.graphed import MethodParts
    from u2pl_scale.engine.step import method_after_push, method_before_push

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sc = step_config()
        cache = GraphCache(method_losses, recorder=RerunRecorder,
                           parts=MethodParts(method_before_push, method_after_push))
        queues = {"eager": big_queues(), "graphed": big_queues()}
        runs = {
            "eager": lambda inputs, queues, progress: method_losses(sc, *inputs, queues, progress),
            "graphed": lambda inputs, queues, progress: cache(sc, inputs, queues, progress),
        }
        results = []
        for step, progress in enumerate((0.1, 0.45, 0.8)):
            results.append({name: _step(fn, 10 * rank + step, queues[name], progress)
                            for name, fn in runs.items()})
        (graphed,) = cache.graphs.values()
        results.append({"split": graphed.split, "stages": len(graphed.stages)})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_at_world_size_two_the_graphed_method_splits_around_the_all_gather_and_equals_the_eager_one(tmp_path):
    """Two gloo ranks: the forward is two captures with the queues' all-gather between them (eager), and every
    step's losses, gradients and queues equal the eager method's; both ranks' queues are the same (each holds both
    ranks' negatives)."""
    import torch.multiprocessing as mp

    from net import free_port

    mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        assert rank[-1] == {"split": True, "stages": 2}
        for step, results in enumerate(rank[:-1]):
            assert_same_step(results["eager"], results["graphed"], step)
    for key in ("buffer", "write_ptr", "fill"):
        assert torch.equal(ranks[0][-2]["graphed"][key], ranks[1][-2]["graphed"][key]), key
    assert not torch.equal(ranks[0][-2]["graphed"]["grad_rep"], ranks[1][-2]["graphed"]["grad_rep"])


def test_the_captures_belong_to_their_queues_and_go_with_them():
    """run_method_losses keeps the captures on the queues they write: another set of queues gets its own, and
    dropping the queues frees their captures (graphs and memory pools on a GPU)."""
    import gc
    import weakref

    from u2pl_scale.engine import graphed as graphed_module
    from u2pl_scale.engine.step import graphed_method_losses

    sc = step_config()
    sc.compile_method_mode = "cuda-graph"
    first, second = big_queues(), big_queues()
    for queues in (first, second):  # the CPU stand-in for the graphs, as run_method_losses would build the cache
        queues.__dict__["graph_cache"] = graphed_module.GraphCache(method_losses, recorder=RerunRecorder)
    for queues in (first, second, first):
        unsup, contra, _ = run_method_losses(sc, *make_inputs(0, 0)[:7], queues, 0.3)
        (unsup + contra).backward()
    assert graphed_method_losses(first) is not graphed_method_losses(second)
    assert graphed_method_losses(first).captures == 1 and graphed_method_losses(second).captures == 1
    (captured,) = graphed_method_losses(first).graphs.values()
    gone = weakref.ref(captured)
    del first, queues, captured, unsup, contra
    gc.collect()
    assert gone() is None


def test_the_two_graph_split_in_one_process_equals_the_eager_method_with_the_same_gather():
    """The world-size > 1 form (two captures, the gather between them) in one process, with a gather that plays
    a second rank sending the same rows: equal to the eager method pushing the same rows, step by step (the GPU
    test runs this with real CUDA graphs on one GPU)."""
    sc = step_config()
    cache = GraphCache(method_losses, recorder=RerunRecorder, parts=split_parts(), world=2)
    queues = {"eager": big_queues(), "graphed": big_queues()}
    runs = {"eager": eager_with_duplicated_push(sc),
            "graphed": lambda inputs, queues, progress: cache(sc, inputs, queues, progress)}
    for seed, progress in ((0, 0.1), (1, 0.45), (2, 0.8)):
        results = {name: _step(fn, seed, queues[name], progress) for name, fn in runs.items()}
        assert_same_step(results["eager"], results["graphed"], seed)
    (graphed,) = cache.graphs.values()
    assert graphed.split and len(graphed.stages) == 2
