"""train.compile_mode: a model replayed as CUDA graphs marks each training step once, at its start (the method's
compiled graphs then leave the marking to it, so the model's outputs of a step live on through the method), and
runs eager while evaluating (whole images change shape). The graphs themselves run on a GPU only
(tests/gpu/test_gpu.py); this checks the wiring that decides them."""
from pathlib import Path

import pytest
import torch

from u2pl_scale.config import ConfigError, load_config
from u2pl_scale.engine.step import (
    StepConfig,
    begin_graph_step,
    begin_model_step,
    model_eager_while_evaluating,
)
from u2pl_scale.method.queues import ClassQueues

REPO = Path(__file__).resolve().parents[2]


def step_config(*overrides):
    return StepConfig.from_config(load_config(REPO / "configs" / "demo.yaml", list(overrides)))


@pytest.mark.parametrize("overrides, graphs", [
    ((), False),
    (("train.compile=true",), False),  # default mode: compiled, no CUDA graphs
    (("train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs"), False),
    (("train.compile=false", "train.compile_mode=reduce-overhead"), False),  # the mode of a model not compiled
    (("train.compile=true", "train.compile_mode=reduce-overhead"), True),
    (("train.compile=true", "train.compile_mode=max-autotune"), True),
])
def test_the_model_is_graphed_only_when_compiled_in_a_cuda_graph_mode(overrides, graphs):
    assert step_config(*overrides).model_graphs is graphs


def test_an_unknown_compile_mode_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"train\.compile_mode"):
        load_config(REPO / "configs" / "demo.yaml", ["train.compile_mode=cudagraphs"])


def test_steps_are_marked_once_by_the_model_when_it_is_graphed(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    queues = ClassQueues(3, 4, [5, 5, 5])
    graphed = step_config("train.compile=true", "train.compile_mode=reduce-overhead")
    plain = step_config()

    begin_model_step(plain)
    begin_graph_step(queues, "reduce-overhead", mark_step=not plain.model_graphs)
    assert len(marks) == 1  # the method's graphs mark the step

    marks.clear()
    begin_model_step(graphed)
    begin_graph_step(queues, "reduce-overhead", mark_step=not graphed.model_graphs)
    assert len(marks) == 1  # the model marks it, the method does not again
    begin_graph_step(queues, "default")
    assert len(marks) == 1  # a method compiled without CUDA graphs marks nothing


class Probe(torch.nn.Module):
    def forward(self, x):
        self.compiled = torch.compiler.is_compiling()
        return x + 1


@pytest.mark.parametrize("graphs", [False, True])
def test_a_graphed_model_runs_eager_while_evaluating(graphs):
    sc = step_config("train.compile=true", f"train.compile_mode={'reduce-overhead' if graphs else 'default'}")
    model = Probe()
    model.compile(backend="eager")  # the stance does not depend on the backend; "eager" compiles in no time
    with model_eager_while_evaluating(sc):
        model(torch.zeros(2))
    assert model.compiled is not graphs
    model(torch.zeros(3))
    assert model.compiled  # compiled again after evaluating
