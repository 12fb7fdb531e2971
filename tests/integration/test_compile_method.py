"""train.compile_method: the method losses under torch.compile, on CPU; and the eager reference stages on CPU.

Compiled code takes the method's reference stages (u2pl_scale/method, what a GPU runs but for two Triton kernels),
while the eager trainer on CPU takes the CPU stages (u2pl_scale/accel/cpu.py). So comparing the two here also
checks, in a whole method step, that both compute the same losses, gradients and queues. Inductor is asked to draw
random numbers with torch's eager ops (fallback_random) so both sample the same anchors and negatives.
"""
import os

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from method_inputs import make_inputs, step_config
from net import free_port
from u2pl_scale import accel
from u2pl_scale.engine.step import method_runs_in_graph, run_method_losses
from u2pl_scale.method.stages import REFERENCE


def run(compiled: bool, seed: int, progress: float, stages=None):
    """One method step; eager with the CPU stages unless `stages` says otherwise, compiled with the reference
    stages (as accel.select chooses for compiled code)."""
    stages = stages or accel.select("cpu", compiled=compiled)
    pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues = make_inputs(seed, seed, stages=stages)
    sc = step_config(stages)
    torch.manual_seed(1000 + seed)
    sc.compile_method = compiled
    unsup, contra, reliable = run_method_losses(sc, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues,
                                                progress)
    runs = method_runs_in_graph(unsup + contra)
    (unsup + contra).backward()
    return dict(unsup=unsup.detach(), contra=contra.detach(), reliable=reliable.detach(), grad_pred=pred.grad,
                grad_rep=rep.grad, buffer=queues.buffer[:-1].clone(), write_ptr=queues.write_ptr.clone(),
                fill=queues.fill.clone(), runs=runs)


def assert_same(eager: dict, compiled: dict):
    # the pushed rows are the teacher's unit-normalised features: fused normalisation may differ in the last bit
    for key in ("unsup", "contra", "reliable", "grad_pred", "grad_rep", "buffer"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)
    assert eager["contra"] > 0 and eager["grad_rep"].abs().sum() > 0  # the contrastive term did something
    for key in ("write_ptr", "fill"):
        assert torch.equal(compiled[key], eager[key]), key


def test_eager_reference_stages_match_the_cpu_stages():
    """The reference stages (compacted queue write, sort-based percentiles and ranks, one-hot prototype sums, no
    pooled buffers), run eagerly on CPU, against the CPU stages: same losses, gradients and queues."""
    for seed, progress in ((0, 0.1), (1, 0.45), (2, 0.8)):
        cpu = run(False, seed, progress)
        assert accel.select("cpu").name == "cpu"
        assert_same(cpu, run(False, seed, progress, stages=REFERENCE))


def test_compiled_method_is_one_graph_that_matches_the_eager_host_path():
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        for seed, progress in ((0, 0.1), (1, 0.45), (2, 0.8)):
            eager = run(False, seed, progress)
            compiled = run(True, seed, progress)
            assert_same(eager, compiled)
            # the diagnostic the step benchmark reads between timed phases (no profiler) tells the two apart
            assert eager["runs"]["compiled"] == 0 and eager["runs"]["eager"] == 1, eager["runs"]
            assert compiled["runs"]["compiled"] == 1 and compiled["runs"]["eager"] == 0, compiled["runs"]
    # one graph for the whole method (no graph breaks), and a new training progress does not recompile it
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def _rank_worker(rank: int, port: int, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        with inductor_config.patch(fallback_random=True):
            for compiled in (False, True):
                stages = accel.select("cpu", compiled=compiled)
                pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues = make_inputs(10 + rank, 10,
                                                                                          stages=stages)
                torch.manual_seed(7)
                sc = step_config(stages)
                sc.compile_method = compiled
                unsup, contra, _ = run_method_losses(sc, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t,
                                                     queues, 0.3)
                (unsup + contra).backward()
                results[compiled] = dict(contra=contra.detach(), grad_rep=rep.grad, queues=queues.state_dict())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_compiled_method_on_two_gloo_ranks_shares_the_queues_as_eager_does(tmp_path):
    mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        eager, compiled = rank[False], rank[True]
        torch.testing.assert_close(compiled["contra"], eager["contra"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled["grad_rep"], eager["grad_rep"], rtol=1e-5, atol=1e-6)
        for key in ("write_ptr", "fill"):
            assert torch.equal(compiled["queues"][key], eager["queues"][key]), key
        torch.testing.assert_close(compiled["queues"]["buffer"][:-1], eager["queues"]["buffer"][:-1], rtol=1e-5,
                                   atol=1e-6)
    # both ranks pushed both ranks' negatives into the same queues: identical queues
    for key in ("buffer", "write_ptr", "fill"):
        assert torch.equal(ranks[0][True]["queues"][key][:-1 if key == "buffer" else None],
                           ranks[1][True]["queues"][key][:-1 if key == "buffer" else None]), key


def test_compile_method_takes_no_generator():
    with pytest.raises(ValueError, match="global RNG"):
        run_method_losses(step_config(), *make_inputs(0, 0), 0.5, generator=torch.Generator())
