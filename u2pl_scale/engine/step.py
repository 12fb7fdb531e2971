"""One training step, read top to bottom as U2PL_SPEC.md §3 writes it.

Returns the loss terms as device tensors; nothing here reads a value back to the host (no .item(), no Python
branch on tensor values), so the GPU never waits inside the step. Logging reads them every N steps.
"""
from __future__ import annotations

import collections
import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..method.contrastive import contrastive_finish, contrastive_inputs, contrastive_prepare, push_prepared
from ..method.color import random_hue
from ..method.cutmix import cutmix, cutmix_flag
from ..method.diagnostics import step_diagnostics
from ..method.losses import ce_mean, ohem_ce, unsup_loss_from_reliable
from ..method.reliability import alpha_t, drop_percent, reliability
from ..method.stages import REFERENCE, Stages


@dataclass
class StepConfig:
    num_classes: int
    ignore_index: int
    aux_weight: float
    unsup_weight: float
    contra_weight: float
    contra_enabled: bool
    drop_percent_start: float
    low_entropy_start: float
    cutmix_prob: float
    hue_jitter: float
    mean: tuple
    std: tuple
    ohem: bool
    ohem_thresh: float
    ohem_min_kept: int
    anchor_threshold: float
    negative_threshold: float
    low_rank: int
    high_rank: int
    num_anchors: int
    num_negatives: int
    temperature: float
    compile_method: bool = False
    compile_method_mode: str = "reduce-overhead"
    model_graphs: bool = False  # the model compiled as CUDA graphs (train.compile_mode): it marks the steps
    stages: Stages = REFERENCE  # the method's stage implementations (u2pl_scale.accel.select)

    @classmethod
    def from_config(cls, cfg, stages: Stages = REFERENCE) -> "StepConfig":
        m, c = cfg.method, cfg.method.contrastive
        return cls(num_classes=cfg.data.num_classes, ignore_index=cfg.data.ignore_index,
                   aux_weight=cfg.model.aux_weight if cfg.model.aux_head else 0.0,
                   unsup_weight=m.unsup_weight, contra_weight=c.weight, contra_enabled=c.enabled,
                   drop_percent_start=m.drop_percent_start, low_entropy_start=c.low_entropy_start,
                   cutmix_prob=m.cutmix_prob, hue_jitter=m.hue_jitter, mean=tuple(cfg.data.mean),
                   std=tuple(cfg.data.std), ohem=m.ohem.enabled, ohem_thresh=m.ohem.thresh,
                   ohem_min_kept=m.ohem.min_kept, anchor_threshold=c.anchor_threshold,
                   negative_threshold=c.negative_threshold, low_rank=c.low_rank, high_rank=c.high_rank,
                   num_anchors=c.num_anchors, num_negatives=c.num_negatives, temperature=c.temperature,
                   compile_method=cfg.train.compile_method, compile_method_mode=cfg.train.compile_method_mode,
                   model_graphs=cfg.train.compile and uses_cuda_graphs(cfg.train.compile_mode), stages=stages)


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (align_corners) to `size`, from contiguous logits: a small copy at stride 4 of the channels-last
    model output, so that the crop-size class reductions that follow (softmax, CE, entropy) read each class plane
    contiguously instead of channels-last rows (several times slower on CPU)."""
    return F.interpolate(logits.contiguous(), size=size, mode="bilinear", align_corners=True)


def supervised_loss(sc: StepConfig, logits_l: torch.Tensor, aux_l, labels: torch.Tensor) -> torch.Tensor:
    """CE (or OHEM) at crop size, plus the weighted aux loss (spec §3.5, §5)."""
    size = labels.shape[-2:]

    def criterion(logits):
        logits = upsample(logits.float(), size)
        if sc.ohem:
            return ohem_ce(logits, labels, thresh=sc.ohem_thresh, min_kept=sc.ohem_min_kept,
                           ignore_index=sc.ignore_index)
        return ce_mean(logits, labels, ignore_index=sc.ignore_index)  # 0, not NaN, when every pixel is ignored

    loss = criterion(logits_l)
    if aux_l is not None and sc.aux_weight > 0:
        loss = loss + sc.aux_weight * criterion(aux_l)
    return loss


def supervised_step(sc: StepConfig, student, x_l: torch.Tensor, y_l: torch.Tensor, autocast_ctx) -> dict:
    """Warm-up / supervised-only step: the representation head joins with weight 0 so DDP sees every parameter."""
    with autocast_ctx():
        out = student(x_l)
    sup = supervised_loss(sc, out["pred"], out.get("aux"), y_l)
    loss = sup + 0.0 * out["rep"].float().sum()
    zero = torch.zeros((), device=x_l.device)
    return {"loss": loss, "sup": sup.detach(), "unsup": zero, "contra": zero, "reliable": zero,
            "sup_empty": empty_labels(sc, y_l)}


def empty_labels(sc: StepConfig, y_l: torch.Tensor) -> torch.Tensor:
    """1.0 when every pixel of the labeled batch is ignored (its supervised loss is 0), else 0.0: counted."""
    return (y_l != sc.ignore_index).any().logical_not().float()


def pseudo_labels(sc: StepConfig, teacher, x_u, valid_u, autocast_ctx, generator=None):
    """Steps 2-3: teacher (eval mode) argmax on the weakly augmented unlabeled batch, then CutMix of images and
    pseudo-labels (and confidence) with one box per image, for the whole batch with probability cutmix_prob,
    and, if method.hue_jitter > 0 (off in the published defaults), a random hue rotation of each image."""
    teacher.eval()
    with torch.no_grad(), autocast_ctx():
        prob_u = torch.softmax(upsample(teacher(x_u)["pred"].float(), x_u.shape[-2:]), dim=1)
    conf_u, pseudo_u = prob_u.max(dim=1)
    pseudo_u = torch.where(valid_u, pseudo_u, torch.full_like(pseudo_u, sc.ignore_index))
    apply = cutmix_flag(sc.cutmix_prob, generator=generator, device=x_u.device)
    x_u, pseudo_u, _ = cutmix(x_u, pseudo_u, conf_u, apply=apply, generator=generator)
    if sc.hue_jitter > 0:
        x_u = random_hue(x_u, sc.hue_jitter, sc.mean, sc.std, generator=generator)
    return x_u, pseudo_u


def teacher_targets(teacher, x_all, num_labeled: int, autocast_ctx):
    """Step 6: teacher forward on the student's batch, no grad, in train mode as published (its BN statistics
    move) -> stride-4 probabilities, stride-4 features, and the unlabeled logits at crop size."""
    teacher.train()
    with torch.no_grad(), autocast_ctx():
        out_t = teacher(x_all)
    pred_t = out_t["pred"].float()
    return torch.softmax(pred_t, dim=1), out_t["rep"].float(), upsample(pred_t[num_labeled:], x_all.shape[-2:])


def method_losses(sc: StepConfig, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues, progress: float,
                  generator=None):
    """Step 7: reliable pseudo-labels and entropy masks from one on-device sort, the unsupervised loss (spec §4)
    and the contrastive loss with unreliable pixels as negatives, queues updated (spec §6). In three parts:
    `method_before_push`, the push of this step's negatives to the queues every rank shares (one collective),
    `method_after_push` (train.compile_method_mode=cuda-graph captures the first and last apart at world size > 1)."""
    unsup, reliable, prepared = method_before_push(sc, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues,
                                                   progress)
    if prepared is not None:
        push_prepared(prepared, queues)
    return unsup, method_after_push(sc, rep, prepared, queues, generator), reliable


def method_before_push(sc: StepConfig, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues, progress):
    """method_losses up to the queue push: (unsup, reliable ratio, the contrastive part's ContrastivePrepared or
    None without the contrastive loss)."""
    b_l = y_l.shape[0]
    ignore = sc.ignore_index
    rel = reliability(logits_u_t, pseudo_u, drop_percent(progress, sc.drop_percent_start),
                      alpha_t(progress, sc.low_entropy_start), ignore_index=ignore, stages=sc.stages)
    unsup = unsup_loss_from_reliable(upsample(pred[b_l:], y_l.shape[-2:]), rel.reliable_labels, rel.kept_count,
                                     rel.valid_count, ignore_index=ignore, stages=sc.stages)
    prepared = None
    if sc.contra_enabled:
        labels_small, low_small, high_small = contrastive_inputs(
            y_l, pseudo_u, rel.low_mask, rel.high_mask, rep.shape[-2:], ignore_index=ignore)
        prepared = contrastive_prepare(
            rep_t, prob_t, labels_small, low_small, high_small, b_l, queues.dtype,
            anchor_threshold=sc.anchor_threshold, negative_threshold=sc.negative_threshold, low_rank=sc.low_rank,
            high_rank=sc.high_rank, stages=sc.stages)
    return unsup, rel.reliable_ratio, prepared


def method_after_push(sc: StepConfig, rep, prepared, queues, generator=None):
    """method_losses after the queue push: the contrastive loss (0, attached to rep, without it)."""
    if prepared is None:
        return 0.0 * rep.sum()
    return contrastive_finish(rep, prepared, queues, num_anchors=sc.num_anchors, num_negatives=sc.num_negatives,
                              temperature=sc.temperature, generator=generator, stages=sc.stages).loss


@functools.cache
def compiled_method_losses(mode: str):
    """method_losses under torch.compile (train.compile_method, train.compile_method_mode). Compiled code takes the
    method's reference stages (accel.select with compiled=True), so it traces as one graph with static shapes:
    on a GPU its hundreds of small kernels fuse into a few, and with mode reduce-overhead the
    forward and the backward each replay as one CUDA graph. At world size > 1 the queues' all-gather splits it.
    Its random draws (anchor and negative sampling) come from inductor's generator, seeded from torch's."""
    return torch.compile(method_losses, dynamic=False, mode=mode)


def graphed_method_losses(queues):
    """method_losses captured by hand as CUDA graphs (train.compile_method_mode=cuda-graph), one capture per input
    signature: see engine/graphed.py. The captures belong to the queues they update (an attribute of theirs), so
    they and their memory pools go when the queues go (a process that trains twice keeps no stale graphs)."""
    from .graphed import GraphCache, MethodParts

    cache = queues.__dict__.get("graph_cache")
    if cache is None:
        cache = queues.__dict__["graph_cache"] = GraphCache(
            method_losses, parts=MethodParts(method_before_push, method_after_push))
    return cache


def check_method_mode(train_cfg, device) -> None:
    """At the start of training (cfg.train): train.compile_method_mode=cuda-graph needs a CUDA device."""
    from ..config import ConfigError

    if not (train_cfg.compile_method and train_cfg.compile_method_mode == "cuda-graph"):
        return
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(f"train.compile_method_mode=cuda-graph needs a CUDA device, not {device.type}: "
                          "use reduce-overhead (compiled on every device) or train.compile_method=false")


def uses_cuda_graphs(mode: str) -> bool:
    """Whether a torch.compile mode replays the compiled graph as CUDA graphs (on a CUDA device)."""
    return mode in ("reduce-overhead", "max-autotune")


def begin_graph_step(queues, mode: str, mark_step: bool = True) -> None:
    """Before each call of the method compiled with `mode`. With CUDA graphs: the queue tensors, updated in place
    by the method, become static inputs (fixed addresses, which a graph may write; inductor would otherwise skip CUDA
    graphs for a graph that mutates its inputs), and a new step begins (the last step's graph outputs are no longer
    read, so the next replay may overwrite them) unless the caller marks steps itself (`mark_step` False: the model
    is graphed too, and its outputs of this step must live on through the method)."""
    if not uses_cuda_graphs(mode):
        return
    for tensor in queues.state_dict().values():
        if getattr(tensor, "_dynamo_static_input_type", None) is None:
            torch._dynamo.mark_static_address(tensor)
    if mark_step:
        torch.compiler.cudagraph_mark_step_begin()


def model_eager_while_evaluating(sc: StepConfig):
    """Where the model replays as CUDA graphs: a context in which it runs eager. Evaluation's whole images change
    shape from one image to the next, and each shape would record (and keep) a graph of its own."""
    if sc.model_graphs and hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def begin_model_step(sc: StepConfig) -> None:
    """At the start of each training step whose model replays as CUDA graphs: the last step's graph outputs are
    no longer read, so this step's replays may overwrite them."""
    if sc.model_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def method_runs_in_profile(prof) -> dict:
    """How the method ran inside a finished torch.profiler run: `compiled` (calls of compiled regions), `captured`
    (replays of the method captured by hand, train.compile_method_mode=cuda-graph), `graph_launches` (CUDA graph
    replays) and `eager` (nodes of the eager contrastive loss, an autograd.Function that compiled code inlines).
    A diagnostic: dynamo can fall back to eager silently."""
    names = collections.Counter(event.name for event in prof.events())
    return {"compiled": sum(n for name, n in names.items() if name.startswith("Torch-Compiled Region")),
            "captured": names["_Replay"],
            "graph_launches": names["cudaGraphLaunch"],
            "eager": names["_AnchorLoss"] + names["_AnchorLossBackward"]}


def method_runs_in_graph(loss: torch.Tensor) -> dict:
    """How the method ran, read from the autograd graph behind `loss` before its backward, without a profiler:
    `compiled` (backward nodes of compiled regions), `captured` (of the method captured by hand as CUDA graphs,
    train.compile_method_mode=cuda-graph) and `eager` (backward nodes of the eager contrastive loss).
    For benchmarks that must not profile CUDA between timed phases: a CUDA profile leaves CUPTI attached once
    inductor's CUDA graphs are in use (pytorch/pytorch#144455)."""
    names, seen, stack = collections.Counter(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[node.name()] += 1
        stack.extend(child for child, _ in node.next_functions)
    return {"compiled": names["CompiledFunctionBackward"], "captured": names["_ReplayBackward"],
            "eager": names["_AnchorLossBackward"]}


def progress_tensor(progress: float, device) -> torch.Tensor:
    """The training progress as the compiled method takes it: a tensor on the training device, filled by a kernel
    from the host value (no copy, no sync). A float would be a constant of the graph and recompile it every epoch;
    a host tensor would be copied over, which synchronises."""
    return torch.full((), progress, dtype=torch.float64, device=device)


def run_method_losses(sc: StepConfig, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues, progress: float,
                      generator=None):
    """method_losses, compiled when sc.compile_method."""
    if not sc.compile_method:
        return method_losses(sc, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues, progress, generator)
    if sc.compile_method_mode == "cuda-graph":
        inputs = (pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t)
        return graphed_method_losses(queues)(sc, inputs, queues, progress, generator)
    if generator is not None:
        raise ValueError("train.compile_method draws from torch's global RNG; it takes no generator")
    begin_graph_step(queues, sc.compile_method_mode, mark_step=not sc.model_graphs)
    out = compiled_method_losses(sc.compile_method_mode)(sc, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t,
                                                         queues, progress_tensor(progress, pred.device))
    # CUDA-graph outputs live in the graph's memory pool until its next replay: the caller may keep them longer
    return tuple(t.clone() for t in out) if uses_cuda_graphs(sc.compile_method_mode) else out


def u2pl_step(sc: StepConfig, student, teacher, queues, x_l, y_l, x_u, valid_u, progress: float, autocast_ctx,
              generator: torch.Generator | None = None, diagnose: bool = False) -> dict:
    """The semi-supervised step (spec §3); `progress` = epoch / epochs drives both schedules. With `diagnose` (log
    steps) the result also holds `diag`: what the method did (method/diagnostics.py)."""
    b_l = x_l.shape[0]
    # 2-3. pseudo-labels, CutMix
    x_u, pseudo_u = pseudo_labels(sc, teacher, x_u, valid_u, autocast_ctx, generator)
    # 4-5. student on labeled + mixed unlabeled, supervised loss
    x_all = torch.cat([x_l, x_u])
    with autocast_ctx():
        out = student(x_all)
    pred, rep = out["pred"].float(), out["rep"].float()
    aux = out.get("aux")
    sup = supervised_loss(sc, pred[:b_l], aux[:b_l] if aux is not None else None, y_l)
    # 6. teacher on the same batch
    prob_t, rep_t, logits_u_t = teacher_targets(teacher, x_all, b_l, autocast_ctx)
    # 7. unsupervised and contrastive losses
    unsup, contra, reliable = run_method_losses(sc, pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues,
                                                progress, generator)
    # 8. total loss
    loss = sup + sc.unsup_weight * unsup + sc.contra_weight * contra
    terms = {"loss": loss, "sup": sup.detach(), "unsup": unsup.detach(), "contra": contra.detach(),
             "reliable": reliable.detach(), "sup_empty": empty_labels(sc, y_l)}
    if diagnose:
        terms["diag"] = step_diagnostics(
            pred.detach(), y_l, pseudo_u, prob_t, logits_u_t, progress, ignore_index=sc.ignore_index,
            drop_percent_start=sc.drop_percent_start, low_entropy_start=sc.low_entropy_start,
            anchor_threshold=sc.anchor_threshold, negative_threshold=sc.negative_threshold, low_rank=sc.low_rank,
            high_rank=sc.high_rank)
    return terms
