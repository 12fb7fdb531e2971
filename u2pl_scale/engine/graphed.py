"""train.compile_method_mode=cuda-graph: the eager method (the CUDA stages) captured by hand as two CUDA graphs.

At the published 2 + 2 images per GPU the training step is bound by the host launching kernels, and the eager
method issues over a hundred small ones. torch.compile's reduce-overhead mode replays the method as CUDA graphs
too, but through dynamo's guards, AOTAutograd's runtime wrappers and inductor's CUDA graph trees, which can make
the whole process slower after compiling. This
mode has none of that: the eager code (static shapes, no host reads: the CUDA stages) is captured once per input
signature, forward and backward each as one graph, the way torch.cuda.make_graphed_callables does it, and each
step copies its inputs into the graphs' static inputs and replays them.

- The queues are updated in place by the captured push: the graphs write the queue tensors at the addresses they
  had at capture (the key of the cache below includes those addresses). Warm-up runs before the capture push
  into the queues too, so the queues' state is saved before and restored after them; the RNG state as well, so
  capturing does not shift the training's random draws.
- Random draws (anchor and negative sampling) use torch's default CUDA generator, which a captured graph advances
  at each replay: the same draws as the eager method from the same generator state.
- Outputs are cloned (the static ones are overwritten by the next replay; callers keep the terms for logging);
  the input gradients the backward replay returns are consumed by the student's backward of the same step.
- At world size > 1 the queues' all-gather stays out of the graphs: the forward is two graphs (everything before
  the push, which needs no gradients, and the push with the rest) with the eager all-gather between them into a
  fixed buffer the second graph reads.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..dist import all_gather_into, get_world_size

MAX_SIGNATURES = 4  # captured input signatures kept (a new batch shape captures anew)
WARMUP_STEPS = 2  # eager runs before the capture (lazy inits, Triton's JIT, cached constants), undone after


class CudaRecorder:
    """Captures a function into a CUDA graph once and replays it; the outputs are the capture's static tensors."""

    def __init__(self, pool):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.out = None

    def capture(self, fn: Callable):
        # thread_local: the data loader's pin-memory thread may call CUDA while this thread captures
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            self.out = fn()

    def replay(self):
        self.graph.replay()
        return self.out


class RerunRecorder:
    """The test double of CudaRecorder where no GPU is (CPU tests): capture only remembers the function and each
    replay runs it again on the same static inputs, so everything around the graphs (static input copies, queue
    and RNG restore after warm-up, the autograd plumbing, the cache) runs as on a GPU."""

    def __init__(self, pool=None):
        self.fn = None
        self.out = None

    def capture(self, fn: Callable):
        self.fn = fn

    def replay(self):
        with torch.enable_grad():  # called from inside an autograd.Function's forward, where grad mode is off
            self.out = self.fn()
        return self.out


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@dataclass
class MethodParts:
    """The method in two parts around the queues' all-gather (world size > 1): `before(sc, *inputs, queues,
    progress)` -> (unsup, reliable ratio, ContrastivePrepared) and `after(sc, rep, prepared, queues)` -> contra;
    `gather(out, packed)` fills `out` with every rank's packed rows in rank order (tests swap in their own)."""
    before: Callable
    after: Callable
    gather: Callable = all_gather_into


class GraphedMethod:
    """method_losses(sc, inputs..., queues, progress) for one input signature, as a forward and a backward graph
    over static inputs. `method(sc, *inputs, queues, progress_tensor)` must be capturable (static shapes, no host
    reads) and return (unsup, contra, reliable ratio); the first two inputs (the student's logits and features) get
    gradients. With `parts` and `world` > 1 the forward is two graphs, `parts.before` with the packing of the push
    rows and the push with `parts.after`, and between them the eager all-gather of the packed rows into a fixed
    buffer (collectives are left out of the graphs); one backward graph still covers both."""

    def __init__(self, method: Callable, sc, queues, example: tuple, recorder=CudaRecorder,
                 parts: Optional[MethodParts] = None, world: int = 1):
        device = example[0].device
        self.static = [t.detach().clone() for t in example]
        self.static[0].requires_grad_()
        self.static[1].requires_grad_()
        self.progress = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_outputs = [torch.zeros((), device=device), torch.zeros((), device=device)]
        self.split = parts is not None and world > 1
        self.parts, self.world, self.out_a, self.gathered = parts, world, None, None
        leaves = (self.static[0], self.static[1])

        if not self.split:
            stages = [lambda: method(sc, *self.static, queues, self.progress)]
        else:
            def before():
                unsup, reliable, prepared = parts.before(sc, *self.static, queues, self.progress)
                return unsup, reliable, prepared, queues.pack(prepared.push_rows, prepared.push_mask)

            def after():  # reads the first graph's outputs and the gathered rows (fixed addresses on a GPU)
                queues.push_packed(self.gathered)
                return parts.after(sc, self.static[1], self.out_a[2], queues)

            stages = [before, after]

        def input_grads(outputs):
            unsup, contra, _ = outputs
            grads = torch.autograd.grad((unsup, contra), leaves, grad_outputs=self.grad_outputs, allow_unused=True)
            return tuple(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves))

        # warm-up: lazy initialisations and constants cached by the method happen outside the capture; its pushes
        # into the queues (saved in a copy of the queues' tensors meanwhile) and its random draws are undone
        saved = {name: t.clone() for name, t in queues.state_dict().items()}
        rng = _rng_state(device)
        on_cuda = device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(device)
        side = torch.cuda.Stream(device) if on_cuda else None
        with torch.cuda.stream(side) if on_cuda else contextlib.nullcontext():
            for _ in range(WARMUP_STEPS):
                input_grads(self._run_stages(len(stages), lambda i: stages[i]()))
        if on_cuda:
            torch.cuda.synchronize(device)
        for name, t in queues.state_dict().items():
            t.copy_(saved[name])
        _set_rng_state(rng, device)

        pool = torch.cuda.graph_pool_handle() if on_cuda else None
        self.stages = [recorder(pool) for _ in stages]
        self.backward_graph = recorder(pool)
        try:
            for i, (graph, stage) in enumerate(zip(self.stages, stages)):
                graph.capture(stage)
                if self.split and i == 0:
                    self.out_a = graph.out  # the static outputs the second graph reads (None for the CPU stand-in)
            self.backward_graph.capture(lambda: input_grads(self._losses([graph.out for graph in self.stages])))
        except RuntimeError as err:
            raise RuntimeError("train.compile_method_mode=cuda-graph: the method could not be captured as a CUDA "
                               f"graph ({err}); use train.compile_method_mode=reduce-overhead or eager") from err

    def _run_stages(self, count: int, run: Callable) -> tuple:
        """Stage i's outputs from `run(i)` for each of the `count` stages, the gather after the first when split;
        the losses."""
        outs = []
        for i in range(count):
            outs.append(run(i))
            if self.split and i == 0:
                self.out_a = outs[0]
                self._gather()
        return self._losses(outs)

    def _losses(self, outs: list) -> tuple:
        """(unsup, contra, reliable ratio) from the stages' outputs."""
        if not self.split:
            return outs[0]
        (unsup, reliable, _, _), contra = outs
        return unsup, contra, reliable

    def _gather(self) -> None:
        """Every rank's packed push rows into the fixed `gathered` buffer, in rank order (eager: one collective)."""
        packed = self.out_a[3]
        if self.gathered is None:
            self.gathered = packed.new_empty((self.world * packed.shape[0], packed.shape[1]))
        self.parts.gather(self.gathered, packed)

    def replay_forward(self, progress, inputs) -> tuple:
        for static, new in zip(self.static, inputs):
            static.detach().copy_(new)
        self.progress.fill_(progress)
        unsup, contra, reliable = self._run_stages(len(self.stages), lambda i: self.stages[i].replay())
        return unsup.detach().clone(), contra.detach().clone(), reliable.detach().clone()

    def replay_backward(self, grad_unsup, grad_contra) -> tuple:
        self.grad_outputs[0].copy_(grad_unsup)
        self.grad_outputs[1].copy_(grad_contra)
        return tuple(g.detach() for g in self.backward_graph.replay())


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphed: GraphedMethod, progress: float, *inputs):
        ctx.graphed, ctx.num_inputs = graphed, len(inputs)
        unsup, contra, reliable = graphed.replay_forward(progress, inputs)
        ctx.mark_non_differentiable(reliable)
        return unsup, contra, reliable

    @staticmethod
    def backward(ctx, grad_unsup, grad_contra, _grad_reliable):
        grad_pred, grad_rep = ctx.graphed.replay_backward(grad_unsup, grad_contra)
        return (None, None, grad_pred, grad_rep) + (None,) * (ctx.num_inputs - 2)


def _signature(sc, inputs: tuple, queues) -> tuple:
    return (repr(sc), tuple((t.shape, t.dtype, t.stride(), t.device) for t in inputs),
            tuple(t.data_ptr() for t in queues.state_dict().values()))


class GraphCache:
    """One GraphedMethod per input signature (config, shapes, dtypes, strides, queue addresses), the oldest
    dropped past MAX_SIGNATURES (its graphs and memory pool with it)."""

    def __init__(self, method: Callable, recorder=CudaRecorder, parts: Optional[MethodParts] = None,
                 world: Optional[int] = None):
        self.method = method
        self.recorder = recorder
        self.parts = parts
        self.world = world  # None: the process group's
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.captures = 0

    def __call__(self, sc, inputs: tuple, queues, progress: float, generator: Optional[torch.Generator] = None):
        if generator is not None:
            raise ValueError("train.compile_method_mode=cuda-graph draws from torch's default generator; "
                             "it takes no generator")
        key = _signature(sc, inputs, queues)
        graphed = self.graphs.get(key)
        if graphed is None:
            # split around the queues' all-gather only where there is one (and a push: the contrastive loss on)
            world = (self.world or get_world_size()) if getattr(sc, "contra_enabled", False) else 1
            graphed = GraphedMethod(self.method, sc, queues, inputs, self.recorder, self.parts, world)
            self.captures += 1
            self.graphs[key] = graphed
            while len(self.graphs) > MAX_SIGNATURES:
                self.graphs.popitem(last=False)
        return _Replay.apply(graphed, progress, *inputs)
