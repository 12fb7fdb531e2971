"""Bytes each collective of a training step moves, measured on gloo ranks here and modelled for any world size W,
and the projected time per step and weak-scaling efficiency on GPU clusters (issue 26 item 2).

The collectives of one U2PL step on the DDP path (engine/trainer.py, step.py, guard.py), per rank, at W > 1:
  queue        1 all_gather (push_distributed): sum_c min(ceil(cap_c / W), P) rows of rep_dim + 1 values (a label
               column) in the queue's wire dtype, P = pixels per rank at stride 4; each rank gets W times that
  gradient     DDP's bucketed all-reduce of every trainable parameter's gradient (fp32 parameters)
  syncbn       model.sync_bn, GPUs only (no CPU SyncBatchNorm in torch): per BN layer an all_gather of 2C + 1 fp32 in
               the student's and the teacher's train-mode forwards, an all_reduce of 2C fp32 in the backward
  teacher_bn   without SyncBN: 1 all_reduce of the teacher's BN running means and variances (fp32)
  ddp_buffers  DDP's broadcast of all module buffers from rank 0 before each student forward (its default)
  nonfinite    1 all_reduce (MAX) of one fp32 flag after the backward: ranks skip a non-finite step together
  metrics      per log interval: 7 all_reduces of method diagnostics (3 int64 [C], 4 int64) and any_rank's 1 fp32
Not per step: DDP's start-up broadcasts and bucket rebuild, the buffer broadcast at the first U2PL step and before
evaluations, evaluations, checkpoints. Supervised warm-up steps move gradient, ddp_buffers and nonfinite only.
DeepSpeed ZeRO-1 (engine.backend=deepspeed, not measured) replaces the gradient all-reduce by a reduce-scatter of
the gradients and an all-gather of the updated fp32 parameters: the wire bytes of a ring all-reduce.

Bytes in the tables are payloads per rank: `sent` is the tensor a rank hands to the collective, `result` the one it
gets back (W x sent for an all_gather). Measured: W gloo ranks (processes) run the trainer's `train` on the measure
config with torch.distributed's collectives wrapped to count payloads, each attributed to a kind by its call stack;
DDP all-reduces gradients in C++, so a comm hook (torch's default allreduce_hook, the same all-reduce per bucket)
takes them through the wrapped API. Exit status 1 where a measured payload differs from the model's.

Projected time: wire bytes per rank (ring all-reduce 2 (W - 1) / W x S, all-gather (W - 1) x S_rank, broadcast S)
over the link (W <= 8: one node, NVLink 450 GB/s per GPU; beyond: InfiniBand 50 GB/s per GPU, which every rank's
traffic crosses) + 10 us x ceil(log2 W) per call (tree depth; a ring all-gather of small messages grows with W:
SyncBN's figure is a lower bound); metrics amortised over train.log_interval. Compute: --step-ms, default 150 ms =
VOC ResNet-101 DeepLabv3+ at 513, 4 + 4 images per GPU, bf16 channels-last on an H100, between the 2 + 2 (~110 ms)
and 8 + 8 (~230 ms) steps of step_breakdown.py (RESULTS.md). Efficiency = compute / (compute + exposed
communication): "serial" exposes all of it, "overlap" hides the gradient all-reduce behind the backward
(--backward-frac of compute) as DDP's buckets do; the queue exchange sits inside the loss and is never hidden.
Goal: queue exchange <= 2 % of the step at 32 GPUs, <= 5 % at 1024 (of the "overlap" step).

    python benchmarks/scaling.py                                   # measure W = 1, 2, 4 here, project VOC
    python benchmarks/scaling.py --measure-ws none --override method.contrastive.queue_dtype=bfloat16 --step-ms 230
    python benchmarks/scaling.py --measure-ws 2 --measure-override method.contrastive.queue_size=600 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from u2pl_scale.config import Config, load_config, queue_capacities  # noqa: E402

KINDS = ("queue", "gradient", "syncbn", "teacher_bn", "ddp_buffers", "nonfinite", "metrics")
# a tiny U2PL run on the demo shards: every step semi-supervised, queues small enough that their budgets bind
MEASURE_OVERRIDES = ["model.backbone=resnet10t", "data.crop_size=48", "method.sup_only_epoch=0",
                     "method.contrastive.queue_size=1200", "method.contrastive.num_anchors=32", "data.num_workers=0",
                     "train.log_interval=2", "train.progress_bar=false", "train.checkpoint_interval=0"]
EXACT_UP_TO = {"float32": 2 ** 24, "float16": 2048, "bfloat16": 256}  # integers a float type holds exactly
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Op:
    """A kind's calls of one op (all_reduce | all_gather | broadcast) per step or log interval, payload B per rank."""
    kind: str
    op: str
    calls: int
    sent: int
    result: int
    per: str = "step"


def model_shapes(cfg: Config) -> dict:
    """What the collectives' sizes depend on, from the model built on the meta device (no weights, no memory)."""
    from u2pl_scale.model import build_model

    with torch.device("meta"):
        model = build_model(replace(cfg.model, pretrained=False, pretrained_path=""), cfg.data.num_classes)
        rep = model.eval()(torch.empty(2, 3, cfg.data.crop_size, cfg.data.crop_size))["rep"]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return {"params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "param_bytes": {p.element_size() for p in model.parameters() if p.requires_grad}.pop(),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
            "bn_channels": [m.num_features for m in bns],
            "stat_channels": [m.num_features for m in bns if m.track_running_stats],
            "rep_pixels": rep.shape[-2] * rep.shape[-1], "rep_dim": rep.shape[1]}


def collectives(cfg: Config, world: int, shapes: dict, gpu: bool) -> list[Op]:
    """The model: every collective of one U2PL step (and of one log interval) on one rank at world size W."""
    if world == 1:
        return []  # one process: no process group, no DDP, a local queue push
    ops, c = [], cfg.method.contrastive
    if cfg.method.name == "u2pl" and c.enabled:
        pixels = (cfg.data.batch_size_labeled + cfg.data.batch_size_unlabeled) * shapes["rep_pixels"]
        budgets = [math.ceil(math.ceil(c.exchange_fraction * cap) / world) for cap in queue_capacities(cfg)]
        block = max(1, min(max(budgets), pixels))  # fixed-size blocks: at most the pixels a rank has
        rows = sum(min(b, block) for b in budgets)
        wire = c.queue_dtype if cfg.data.num_classes < EXACT_UP_TO[c.queue_dtype] else "float32"
        sent = rows * (shapes["rep_dim"] + 1) * DTYPE_BYTES[wire]
        ops.append(Op("queue", "all_gather", 1, sent, world * sent))
    grad = shapes["params"] * shapes["param_bytes"]  # DDP's buckets: 1 MiB first, then 25 MiB (calls: latency only)
    ops.append(Op("gradient", "all_reduce", 1 + math.ceil(max(0, grad - 2 ** 20) / (25 * 2 ** 20)), grad, grad))
    semi = cfg.method.name == "u2pl"
    if cfg.model.sync_bn and gpu:
        chans, forwards = shapes["bn_channels"], 2 if semi else 1  # the student's and the teacher's train forwards
        gather, reduce = 4 * sum(2 * ch + 1 for ch in chans), 4 * sum(2 * ch for ch in chans)
        ops += [Op("syncbn", "all_gather", forwards * len(chans), forwards * gather, forwards * world * gather),
                Op("syncbn", "all_reduce", len(chans), reduce, reduce)]  # the student's backward
    elif semi and shapes["stat_channels"]:
        stats = 4 * sum(2 * ch for ch in shapes["stat_channels"])
        ops.append(Op("teacher_bn", "all_reduce", 1, stats, stats))
    if shapes["buffer_bytes"] and cfg.engine.backend == "ddp":
        ops.append(Op("ddp_buffers", "broadcast", 1, shapes["buffer_bytes"], shapes["buffer_bytes"]))
    ops.append(Op("nonfinite", "all_reduce", 1, 4, 4))
    diag = 8 * (3 * cfg.data.num_classes + 4) if semi else 0  # the diagnostics, then any_rank's flag
    ops.append(Op("metrics", "all_reduce", 8 if semi else 1, diag + 4, diag + 4, per="log"))
    return ops


def by_kind(ops: list[Op]) -> dict:
    out = {k: {"calls": 0, "sent": 0, "result": 0} for k in KINDS + ("other",)}
    for o in ops:
        out[o.kind] = {f: out[o.kind][f] + getattr(o, f) for f in ("calls", "sent", "result")}
    return out


# ------------------------------------------------------------------------------------------------ measurement
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
_SAME, _INTO = (lambda a: (_nbytes(a[0]),) * 2), (lambda a: (_nbytes(a[1]), _nbytes(a[0])))
_PAYLOAD = {  # op -> (sent, result) bytes from its arguments, positional as every caller here passes them
    "all_reduce": _SAME, "broadcast": _SAME, "all_gather_into_tensor": _INTO, "all_gather_single": _INTO,
    "reduce_scatter_tensor": _INTO, "all_gather": lambda a: (_nbytes(a[1]), sum(_nbytes(t) for t in a[0])),
    "_broadcast_coalesced": lambda a: (sum(_nbytes(t) for t in a[1]),) * 2,
    "barrier": lambda a: (0, 0), "all_gather_object": lambda a: (0, 0), "broadcast_object_list": lambda a: (0, 0)}
# innermost frame that names the kind (function name, or a file for torch's SyncBatchNorm autograd function)
_FRAMES = {"_counting_allreduce_hook": "gradient", "guard.py:check": "nonfinite", "push_distributed": "queue",
           "average_running_stats_": "teacher_bn", "_sync_buffers": "ddp_buffers", "method_metrics": "metrics",
           "any_rank": "metrics", **dict.fromkeys(  # outside the step: U2PL's start, evaluations, checkpoints, the end
               ("broadcast_buffers_", "save", "run_eval", "finish", "gather_objects", "sum_counts"), "outside")}


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _kind(frame) -> tuple[str, str]:
    """(kind, where): the innermost frame that names a kind, unless an outer one is outside the step; `where` names
    the innermost project function, to find an unmodelled collective."""
    kind, where = "other", ""
    while frame is not None:
        code = frame.f_code
        found = _FRAMES.get(f"{Path(code.co_filename).name}:{code.co_name}", _FRAMES.get(code.co_name))
        if found is None and code.co_filename.endswith(os.path.join("nn", "modules", "_functions.py")):
            found = "syncbn"
        if found == "outside":
            return found, ""
        kind = found if kind == "other" and found else kind
        if not where and "u2pl_scale" in code.co_filename:
            where = f"{Path(code.co_filename).name}:{code.co_name}"
        frame = frame.f_back
    return kind, where


def _counting_allreduce_hook(state, bucket):
    """DDP comm hook: torch's default all-reduce of the bucket, through the Python API the counter wraps."""
    return allreduce_hook(None, bucket)


_EVENTS, _STATE = [], {"step": 0, "inside": False}  # (step index, kind, op, sent, result) per call, in a worker


def _counted(name, fn, payload):
    def counted(*args, **kwargs):
        if _STATE["inside"]:  # one collective implemented by another is counted once
            return fn(*args, **kwargs)
        _STATE["inside"] = True
        try:
            kind, where = _kind(sys._getframe(1))
            _EVENTS.append((_STATE["step"], kind, f"{name} {where}" if kind == "other" else name, *payload(args)))
            return fn(*args, **kwargs)
        finally:
            _STATE["inside"] = False
    return counted


def _stepping(fn):
    def step(*args, **kwargs):
        _STATE["step"] += 1
        return fn(*args, **kwargs)
    return step


def _worker(rank: int, world: int, port: int, config: str, overrides: list, steps: int, out_dir: str) -> None:
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    for key in _LAUNCH_VARS:
        os.environ.pop(key, None)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch.nn.parallel import DistributedDataParallel
    from u2pl_scale.engine import backends, trainer
    from u2pl_scale.engine.hooks import TrainHooks

    class CountedDDP(DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, _counting_allreduce_hook)

    class StopAfter(TrainHooks):  # stopping on a log step ends the run with a checkpoint, without an evaluation
        def on_log(self, step, metrics):
            self.stop = step >= steps

        def should_stop(self):
            return getattr(self, "stop", False)

    for name in (n for n in _PAYLOAD if hasattr(tdist, n)):  # all_gather_single: newer torch only
        setattr(tdist, name, _counted(name, getattr(tdist, name), _PAYLOAD[name]))
    backends.DistributedDataParallel = CountedDDP
    trainer.u2pl_step, trainer.supervised_step = _stepping(trainer.u2pl_step), _stepping(trainer.supervised_step)
    run = [f"train.run_dir={out_dir}/run", f"train.max_steps={steps}", "train.device=cpu"]
    summary = trainer.train(load_config(config, overrides + run), StopAfter())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": summary["steps"], "events": _EVENTS}, f)


def measure(config: str, overrides: list, world: int, steps: int) -> dict:
    """Run `steps` U2PL steps on `world` gloo ranks; per kind, the payload of one step (metrics: of one log interval),
    the same on every rank and every step (else marked `uneven`)."""
    cfg = load_config(config, overrides)
    if steps % cfg.train.log_interval or cfg.method.sup_only_epoch:
        raise ValueError(f"measure: steps ({steps}) must be a multiple of train.log_interval "
                         f"({cfg.train.log_interval}), and method.sup_only_epoch must be 0")
    with tempfile.TemporaryDirectory(prefix="u2pl_scaling_") as tmp:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))  # a free port
            port = sock.getsockname()[1]
        try:
            mp.spawn(_worker, args=(world, port, config, overrides, steps, tmp), nprocs=world, join=True)
        except Exception as exc:
            logs = "".join(p.read_text()[-3000:] for p in sorted(Path(tmp).glob("rank*.log")))
            raise RuntimeError(f"measurement at W={world} failed: {exc}\n{logs}") from exc
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    per_rank = []
    for r in ranks:
        if r["steps"] != steps:
            raise RuntimeError(f"W={world}: the run made {r['steps']} steps, not {steps}")
        cells = {k: [(0, 0, 0)] * steps for k in KINDS + ("other",)}  # (calls, sent, result) per step
        for step, kind, _op, sent, result in r["events"]:
            if step and kind != "outside":  # not the set-up before the first step, nor outside the step
                cells[kind][step - 1] = tuple(a + b for a, b in zip(cells[kind][step - 1], (1, sent, result)))
        out = {}
        for kind, per_step in cells.items():
            if kind == "metrics":  # log steps only: the run's sum over its log intervals
                per_step = [tuple(sum(col) / (steps // cfg.train.log_interval) for col in zip(*per_step))]
                per_step = [tuple(int(v) if v == int(v) else v for v in per_step[0])]
            out[kind] = dict(zip(("calls", "sent", "result"), per_step[-1]))
            if len({c[1:] for c in per_step}) > 1 or any(isinstance(v, float) for v in per_step[-1]):
                out[kind]["uneven"] = [c[1:] for c in per_step]
        out["other"]["sites"] = sorted({op for step, kind, op, *_ in r["events"] if step and kind == "other"})
        per_rank.append(out)
    if any(p != per_rank[0] for p in per_rank[1:]):
        raise RuntimeError(f"W={world}: ranks measured different payloads: {per_rank}")
    return per_rank[0]


# ------------------------------------------------------------------------------------------------ projection
def link_gbps(world: int, args) -> float:
    return args.nvlink_gbps if world <= args.gpus_per_node else args.ib_gbps


def wire_bytes(o: Op, world: int) -> float:
    """Bytes a rank sends (= receives): ring all-reduce, ring all-gather, pipelined broadcast."""
    return {"all_reduce": 2 * (world - 1) / world * o.sent, "all_gather": (world - 1) * o.sent}.get(o.op, o.sent)


def project(ops: list[Op], world: int, args, log_interval: int) -> dict:
    """ms per step of each kind, exposed communication and efficiency at world size W."""
    latency_ms = args.latency_us / 1000 * math.ceil(math.log2(world)) if world > 1 else 0.0
    ms = {k: 0.0 for k in KINDS}
    for o in ops:
        t = wire_bytes(o, world) / (link_gbps(world, args) * 1e9) * 1000 + o.calls * latency_ms
        ms[o.kind] += t / (log_interval if o.per == "log" else 1)
    serial = args.step_ms + sum(ms.values())
    overlap = serial - min(ms["gradient"], args.backward_frac * args.step_ms)
    return {"ms": ms, "step_ms_serial": serial, "step_ms_overlap": overlap,
            "efficiency_serial": args.step_ms / serial, "efficiency_overlap": args.step_ms / overlap,
            "queue_share_serial": ms["queue"] / serial, "queue_share_overlap": ms["queue"] / overlap}


def report_measured(args, measure_ws: list, result: dict) -> list:
    """Measure each W here, print measured next to the model; the mismatches."""
    overrides, failures = MEASURE_OVERRIDES + args.measure_override, []
    shapes = model_shapes(cfg := load_config(args.measure_config, overrides))
    print(f"## Measured on gloo ranks here ({args.measure_config} + {' '.join(overrides)}; {args.measure_steps} "
          f"steps): bytes per rank per step (metrics: per log interval of {cfg.train.log_interval} steps)\n")
    print("| W | kind | calls measured / model | sent B measured / model | result B measured / model | ok |")
    print("| --- | --- | --- | --- | --- | --- |")
    result["measured"] = {}
    for world in measure_ws:
        got = measure(args.measure_config, overrides, world, args.measure_steps)
        want = by_kind(collectives(cfg, world, shapes, gpu=False))
        result["measured"][world] = {"measured": got, "model": want}
        for kind in KINDS + ("other",):
            g, w = got[kind], want[kind]
            ok = (g["sent"], g["result"]) == (w["sent"], w["result"]) and "uneven" not in g and \
                (kind == "gradient" or g["calls"] == w["calls"])  # DDP sizes its gradient buckets itself
            if not ok:
                failures.append(f"W={world} {kind}: measured {g}, model {w}")
            if g["calls"] or w["calls"] or (world == 1 and kind == "other"):
                name = kind if g["calls"] or w["calls"] else "any"  # W = 1: no collective at all
                name += f" (at {', '.join(g['sites'])})" if g.get("sites") else ""
                print(f"| {world} | {name} | {g['calls']} / {w['calls']} | {g['sent']} / {w['sent']} | {g['result']} "
                      f"/ {w['result']} | {'yes' if ok else '**NO**'} |")
    if {2, 4} <= set(measure_ws):
        q = {w: result["measured"][w]["measured"]["queue"]["result"] for w in (2, 4)}
        print(f"\nqueue exchange gathered per rank per step, measured: W=2 {q[2]} B, W=4 {q[4]} B "
              f"({'equal' if q[2] == q[4] else 'DIFFERENT'})")
        if q[2] != q[4]:
            failures.append(f"queue exchange bytes differ between W=2 ({q[2]}) and W=4 ({q[4]})")
    return failures


def report_projection(args, result: dict) -> None:
    shapes = model_shapes(cfg := load_config(args.config, args.override))
    ws = [int(w) for w in args.ws.split(",")]
    print(f"\n## Model for {' '.join([args.config] + args.override)} (GPUs, sync_bn={cfg.model.sync_bn}, "
          f"{shapes['params']:,} parameters, queue {cfg.method.contrastive.queue_dtype}): MB per rank per step "
          f"(metrics: per log interval of {cfg.train.log_interval} steps)\n")
    cols = [(k, f) for k in KINDS for f in (("sent", "result") if k in ("queue", "syncbn") else ("sent",))]
    print("| W | " + " | ".join(f"{k} {'gathered' if f == 'result' else f}" for k, f in cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    result["model"] = {}
    for world in ws:
        ops = collectives(cfg, world, shapes, gpu=True)
        k = by_kind(ops)
        result["model"][world] = {"ops": [asdict(o) for o in ops],
                                  "projection": project(ops, world, args, cfg.train.log_interval)}
        print(f"| {world} | " + " | ".join(f"{k[kind][f] / 1e6:.3f}" for kind, f in cols) + " |")
    q = {w: by_kind(collectives(cfg, w, shapes, gpu=True))["queue"]["result"] for w in (2, 4)}
    print(f"\nqueue exchange gathered per rank per step, model: W=2 {q[2]} B, W=4 {q[4]} B "
          f"({'equal' if q[2] == q[4] else 'different'})")
    print(f"\n## Projected ms per step (compute {args.step_ms:g} ms; NVLink {args.nvlink_gbps:g} GB/s for W <= "
          f"{args.gpus_per_node}, else IB {args.ib_gbps:g} GB/s; {args.latency_us:g} us x ceil(log2 W) per call)\n")
    print("| W | link GB/s | " + " | ".join(KINDS) + " | efficiency serial | efficiency overlap | queue share serial | "
          "queue share overlap |")
    print("| --- " * (len(KINDS) + 6) + "|")
    for world in ws:
        pr = result["model"][world]["projection"]
        print(f"| {world} | {link_gbps(world, args):g} | " + " | ".join(f"{pr['ms'][k]:.2f}" for k in KINDS) +
              f" | {100 * pr['efficiency_serial']:.1f} % | {100 * pr['efficiency_overlap']:.1f} % | "
              f"{100 * pr['queue_share_serial']:.2f} % | {100 * pr['queue_share_overlap']:.2f} % |")
    print()
    for world, goal in ((32, 0.02), (1024, 0.05)):
        if world in result["model"]:
            share = result["model"][world]["projection"]["queue_share_overlap"]
            print(f"goal: queue exchange <= {100 * goal:g} % of the step at {world} GPUs: {100 * share:.2f} % -> "
                  f"{'holds' if share <= goal else 'FAILS'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "voc_1464.yaml"), help="projected config (GPUs)")
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE for --config (repeatable)")
    p.add_argument("--measure-config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--measure-override", action="append", default=[], help="KEY=VALUE after the built-in ones")
    p.add_argument("--measure-ws", default="1,2,4", help="world sizes to measure on gloo here; 0 or none: skip")
    p.add_argument("--measure-steps", type=int, default=4)
    p.add_argument("--ws", default="1,2,4,8,32,256,1024", help="world sizes to project")
    for name, default, text in (("--step-ms", 150.0, "compute time of one step on one GPU"),
                                ("--backward-frac", 0.4, "backward share of compute (overlap)"),
                                ("--latency-us", 10.0, "per call and per log2(W) level"),
                                ("--nvlink-gbps", 450.0, "within a node"), ("--ib-gbps", 50.0, "across nodes")):
        p.add_argument(name, type=float, default=default, help=text)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--json", default="", help="write every number here")
    args = p.parse_args(argv)
    measure_ws = [] if args.measure_ws.lower() in ("0", "none", "") else [int(w) for w in args.measure_ws.split(",")]
    result = {"assumptions": {k: v for k, v in vars(args).items() if k != "json"}}
    failures = report_measured(args, measure_ws, result) if measure_ws else []
    report_projection(args, result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("".join(f"MISMATCH {f}\n" for f in failures), end="", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
