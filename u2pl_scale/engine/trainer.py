"""The one training function every launcher calls: `train(cfg, hooks)`.

Flow: process group -> data streams -> student/teacher -> backend (DDP | DeepSpeed) -> for each step: supervised
warm-up or the U2PL step, optimiser + LR + EMA -> logs every N steps -> eval + checkpoint per epoch -> summary.
"""
from __future__ import annotations

import copy
import hashlib
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..atomic import atomic_path, write_json_atomic
from ..config import Config, derive, queue_capacities, to_yaml
from ..data import stream
from ..data.transforms import normalize
from ..method import diagnostics, ema
from ..method.reliability import drop_percent
from ..method.queues import ClassQueues
from ..model import build_model, convert_sync_bn
from . import checkpoint as ckpt
from .backends import build_backend
from .evaluate import evaluate
from .guard import StepGuard
from .hooks import TrainHooks
from .optim import build_optimizer, build_scheduler, describe_groups
from .outputs import RunOutputs, save_prediction_grid
from .precision import DTYPES, autocast, configure_cudnn, resolve_precision
from .step import StepConfig, check_method_mode, supervised_step, u2pl_step


def ensure_demo_data(cfg: Config) -> None:
    """Build the demo shards when the config reads sets of a `demo` directory and that build is missing,
    unfinished (any of its sets without a manifest) or from an older generator. Rank 0 builds, the others wait;
    a `demo` directory holding some other dataset is left alone. Then every set the config names must exist."""
    paths = [cfg.data.labeled, cfg.data.unlabeled, cfg.data.val]
    local = [p for p in paths if isinstance(p, str) and "://" not in p and not p.startswith("pipe:") and "{" not in p]
    roots = sorted({Path(p).parent for p in local if Path(p).parent.name == "demo"})
    if roots and cfg.data.build_demo_if_missing:
        from ..data.demo import demo_state, ensure_demo

        if dist.get_rank() == 0:
            for root in roots:
                if demo_state(root) != "foreign":
                    ensure_demo(root)
        dist.barrier()  # every rank takes it, whatever it saw on disk, so none can pass a build in progress
    # a directory without its manifest is an unfinished build: the manifest is written last
    missing = [p for p in local if not Path(p).exists() or (Path(p).is_dir() and not (Path(p) / "manifest.json").is_file())]
    if missing:
        raise FileNotFoundError(f"data: shard set not found: {missing[0]} (build shards with shards/build.py)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def queue_digest(queues: ClassQueues) -> str:
    """sha256 of the queues' contents and pointers: equal on every rank when the shared queues agree."""
    h = hashlib.sha256()
    for tensor in (queues.buffer, queues.write_ptr, queues.fill):
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Meter:
    """Sums device tensors between log steps; reads them back to the host only when asked. Means, except the
    `COUNTED` terms, which are reported as counts over the interval and kept as run totals."""

    # labeled batches with every pixel ignored (their supervised loss is 0); steps skipped as not finite
    COUNTED = ("sup_empty", "nonfinite")

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.totals: dict[str, float] = {k: 0.0 for k in self.COUNTED}

    def add(self, values: dict) -> None:
        for k, v in values.items():
            if torch.is_tensor(v):
                self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach().clone()
        self.count += 1

    def read(self) -> dict:
        out = {k: float(v) if k in self.COUNTED else float(v) / max(1, self.count) for k, v in self.sums.items()}
        for k in self.COUNTED:
            self.totals[k] += out.get(k, 0.0)
        self.sums, self.count = {}, 0
        return out


def method_metrics(terms: dict, queues: ClassQueues, progress: float, cfg: Config, world: int) -> dict:
    """What the method did at a log step (method/diagnostics.py), summed over ranks (every rank logs at the same
    steps, so the collectives match)."""
    diag = {k: dist.all_reduce_sum(v.clone()) for k, v in terms["diag"].items()}
    metrics = diagnostics.summarize(diag, queues.capacities, queues.fill, world)
    metrics["drop_percent"] = drop_percent(progress, cfg.method.drop_percent_start)
    return metrics


def train(cfg: Config, hooks: TrainHooks | None = None) -> dict:
    hooks = hooks or TrainHooks()
    t_start = time.time()
    info = dist.init_distributed(cfg.train.device)
    dist.write_rank_record(cfg.train.run_dir, info)  # {run_dir}/ranks/rank{R}.json: host and rank variables
    rank, world, device = info.rank, info.world_size, info.device
    check_method_mode(cfg.train, device)
    main = rank == 0
    requested_precision = cfg.train.precision
    cfg.train.precision = resolve_precision(requested_precision, device)  # the resolved config records it
    if main and requested_precision == "auto":
        print(f"[u2pl] train.precision=auto: {cfg.train.precision} ({device.type} "
              f"{'with' if cfg.train.precision == 'bf16' else 'without'} native bf16)", flush=True)
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.num_threads or dist.cpu_threads_per_rank())
    seed_everything(cfg.train.seed + rank)

    ensure_demo_data(cfg)
    unlabeled_size = cfg.data.unlabeled_size or (stream.unlabeled_size(cfg.data.unlabeled) or 0)
    derived = derive(cfg, world, unlabeled_size)
    supervised_only = cfg.method.name == "supervised"
    run_dir = Path(cfg.train.run_dir)
    total = derived.total_steps
    spe = derived.steps_per_epoch
    follow_until = derived.sup_only_steps + cfg.method.teacher_follow_epochs * spe  # spec §2, published EMA start

    if main:
        print("[u2pl] resolved config:\n" + to_yaml(cfg), flush=True)
        few = diagnostics.few_class_warning(cfg.data.num_classes, cfg.method.contrastive.low_rank)
        if few and cfg.method.name == "u2pl" and cfg.method.contrastive.enabled:
            warnings.warn(f"[u2pl] {few}", stacklevel=2)
        print(f"[u2pl] derived: {derived.as_dict()} (rank source: {info.source}, backend: {info.backend}, "
              f"device: {device})", flush=True)

    # model, teacher, optimiser, engine
    configure_cudnn(device, cfg.train.cudnn_benchmark)
    model = build_model(cfg.model, cfg.data.num_classes)
    model = convert_sync_bn(model, cfg.model.sync_bn, device).to(device)
    # DeepSpeed flattens/broadcasts parameters as contiguous byte views, so its weights stay contiguous; inputs are
    # still channels-last, which makes the convolutions run channels-last.
    if cfg.train.channels_last and cfg.engine.backend != "deepspeed":
        model = model.to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    # without SyncBatchNorm each rank's teacher would keep its own BN statistics (its pseudo-labels, the saved and
    # the evaluated teacher would differ by rank): they are averaged after every update instead
    average_teacher_stats = world > 1 and dist.has_local_batchnorm(teacher)
    optimizer = build_optimizer(model, cfg.optim, derived.lr, device)
    if main:
        print(f"[u2pl] parameter groups: {describe_groups(optimizer)}", flush=True)
    scheduler = build_scheduler(optimizer, total, cfg.optim.poly_power)
    backend = build_backend(cfg, model, optimizer, scheduler, device)
    student = backend.forward_model
    module = backend.module
    if cfg.train.compile:
        # nn.Module.compile compiles forward in place, so state_dict keys (checkpoints, EMA) are unchanged
        module.compile()
        teacher.compile()
    queues = ClassQueues(cfg.data.num_classes, cfg.model.rep_dim, queue_capacities(cfg), device=device,
                         dtype=DTYPES[{"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[
                             cfg.method.contrastive.queue_dtype]],
                         exchange_fraction=cfg.method.contrastive.exchange_fraction)
    sc = StepConfig.from_config(cfg)
    autocast_ctx = lambda: autocast(cfg.train.precision, device)  # noqa: E731
    generator = None  # the global (per-rank seeded, checkpointed) RNG drives CutMix and sampling
    guard = StepGuard((module, teacher), optimizer, device, world, cfg.train.max_consecutive_nonfinite,
                      history=cfg.train.log_interval)

    # resume
    step, semi_started, steps_since_copy, best_miou = 0, False, 0, -1.0
    resumed_from = None
    resume_path = ckpt.resolve_resume(cfg.train.resume, run_dir)
    if resume_path is not None:
        state, rng = ckpt.load_checkpoint(resume_path)
        module.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        backend.load_state_dict(state["backend"], resume_path)
        queues.load_state_dict(state["queues"])
        step, semi_started = int(state["step"]), bool(state["semi_started"])
        steps_since_copy, best_miou = int(state["steps_since_copy"]), float(state["best_miou"])
        if rng is not None:
            ckpt.set_rng_state(rng)
        resumed_from = str(resume_path)
        if main:
            print(f"[u2pl] resumed from {resume_path} at step {step}", flush=True)
            saved_world = int(state.get("world_size", world))
            if saved_world != world:
                print(f"[u2pl] the checkpoint was written by {saved_world} rank(s), this run has {world}: weights, "
                      f"teacher, queues and optimiser carry over; the data order, the per-rank randomness and the "
                      f"schedule (steps per epoch, total steps) are this world size's, so the run is not the one "
                      f"{saved_world} rank(s) would have continued", flush=True)

    out = RunOutputs(run_dir, main, total, step, cfg.train.progress_bar)
    out.write_config(to_yaml(cfg))

    def prepare(batch: dict, with_label: bool = True):
        image = normalize(batch["image"].to(device, non_blocking=True), cfg.data.mean, cfg.data.std,
                          cfg.train.channels_last)
        label = batch["label"].to(device, non_blocking=True).long() if with_label else None
        return image, label

    def state_dict() -> dict:
        return {"model": module.state_dict(), "teacher": teacher.state_dict(), "backend": backend.state_dict(),
                "queues": queues.state_dict(), "step": step, "semi_started": semi_started,
                "steps_since_copy": steps_since_copy, "best_miou": best_miou, "config": to_yaml(cfg),
                "world_size": world,
                "meta": ckpt.checkpoint_meta(cfg, "teacher" if semi_started else "student", step)}

    def save(metrics: dict) -> Path:
        path = ckpt.save_checkpoint(run_dir, step, state_dict(), keep=cfg.train.keep_checkpoints,
                                    extra_writer=backend.save_extra, device=device)
        with ckpt.rng_preserved():
            hooks.on_checkpoint(step, str(path), metrics)
        return path

    def run_eval(keep_pictures: int = 0) -> dict:
        nonlocal best_miou
        eval_model = teacher if semi_started else module
        dist.broadcast_buffers_(eval_model)  # the figure is that of the model rank 0 saves
        val_loader = stream.make_val_loader(cfg.data, rank, world)
        result = evaluate(eval_model, val_loader, prepare, cfg.data.num_classes, cfg.data.ignore_index,
                          cfg.eval.mode, cfg.eval.crop_size, cfg.eval.stride_rate, autocast_ctx, keep_pictures,
                          cfg.data.batch_size_val)
        result["model"] = "teacher" if semi_started else "student"
        val_bad.update(result["bad_samples"])  # the last eval's skipped val samples (each eval reads the set)
        if result["miou"] > best_miou:
            best_miou = result["miou"]
            if main:
                with atomic_path(run_dir / "best.pt") as tmp:
                    torch.save({"model": eval_model.state_dict(), "step": step, "miou": best_miou,
                                "meta": ckpt.checkpoint_meta(cfg, result["model"], step)}, tmp)
        out.log(step, {"miou": result["miou"], "best_miou": best_miou}, prefix="val")
        out.message(f"[u2pl] step {step}: {result['model']} mIoU {100 * result['miou']:.2f} "
                    f"({result['eval_mode']})")
        return result

    def at_epoch_end() -> bool:
        return step % spe == 0 or step >= total

    meter = _Meter()
    val_bad: dict[str, int] = {}
    bad_counts: dict[str, int] = {}
    images_seen = 0
    t_loop = time.time()
    t_log = time.time()
    stopped = False
    last_eval = None
    while step < total and not stopped:
        epoch, start_in_epoch = divmod(step, spe)
        steps_this_epoch = min(spe, start_in_epoch + (total - step))
        loader_l = stream.make_train_loader(cfg.data, "labeled", cfg.data.batch_size_labeled, rank, world,
                                            cfg.train.seed, epoch, steps_this_epoch, start_in_epoch)
        loader_u = None
        if not supervised_only:
            loader_u = stream.make_train_loader(cfg.data, "unlabeled", cfg.data.batch_size_unlabeled, rank, world,
                                                cfg.train.seed, epoch, steps_this_epoch, start_in_epoch)
        progress = epoch / cfg.train.epochs
        batches = zip(loader_l, loader_u) if loader_u is not None else ((b, None) for b in loader_l)
        loaders = [ld for ld in (loader_l, loader_u) if ld is not None]
        for batch_l, batch_u in batches:
            x_l, y_l = prepare(batch_l)
            semi = not supervised_only and step >= derived.sup_only_steps
            if semi and not semi_started:
                # spec §2: the teacher starts as the student; as rank 0's student (DDP's buffers are rank 0's, and
                # rank 0's are what a checkpoint holds), so a run resumed at this point starts the same teacher
                dist.broadcast_buffers_(module)
                ema.copy_(teacher, module)
                semi_started, steps_since_copy = True, 0
            guard.begin(step, batch_l["key"] + (batch_u["key"] if semi else []))  # after the copy: what a skip keeps
            if semi:
                x_u, _ = prepare(batch_u, with_label=False)
                valid_u = batch_u["valid"].to(device, non_blocking=True)
                logging_next = (step + 1) % cfg.train.log_interval == 0 or step + 1 == total
                terms = u2pl_step(sc, student, teacher, queues, x_l, y_l, x_u, valid_u, progress, autocast_ctx,
                                  generator, diagnose=logging_next)
                images_seen += x_l.shape[0] + x_u.shape[0]
            else:
                terms = supervised_step(sc, student, x_l, y_l, autocast_ctx)
                images_seen += x_l.shape[0]
            backend.backward_and_step(terms["loss"], guard)
            terms["nonfinite"] = guard.bad.float()
            if semi:
                if guard.skip_on_host():
                    pass  # a skipped step leaves the teacher (engine/guard.py)
                elif step < follow_until:
                    ema.follow_(teacher, module)  # the student did not move on a skipped step: a no-op then
                else:
                    ema.update_(teacher, module, steps_since_copy, cfg.method.ema_decay, gate=guard.ema_gate())
                steps_since_copy += 1
            guard.end(step)  # before the teacher's statistics are averaged: a skipped step's are put back first
            if semi and average_teacher_stats:
                dist.average_running_stats_(teacher)
            meter.add(terms)
            step += 1
            out.advance()
            if step % cfg.train.log_interval == 0 or step == total:
                now = time.time()
                metrics = meter.read()  # the one host read, on logging steps only
                metrics.update(lr=backend.lr, epoch=epoch, phase="u2pl" if semi else "sup-only",
                               images_per_s=images_seen * world / max(1e-9, now - t_loop),
                               step_s=(now - t_log) / cfg.train.log_interval)
                if semi:
                    metrics.update(method_metrics(terms, queues, progress, cfg, world))
                skipped = dist.add_counts(bad_counts, *(ld.bad_counts for ld in loaders))  # this epoch's so far
                if skipped:
                    metrics["bad_samples"] = skipped
                t_log = now
                out.log(step, metrics)
                with ckpt.rng_preserved():
                    hooks.on_log(step, metrics)
                guard.stop_if_exhausted(run_dir, say=out.message)
            # an epoch end is saved below, after the evaluation
            if cfg.train.checkpoint_interval and step % cfg.train.checkpoint_interval == 0 and not at_epoch_end():
                save({"step": step})
            # ranks must agree to stop at the same step (the checkpoint is collective): ask on log steps only
            if step % cfg.train.log_interval == 0 and dist.any_rank(hooks.should_stop(), device):
                stopped = True
                break
            if step >= total:
                break
        bad_counts = dist.add_counts(bad_counts, *(ld.bad_counts for ld in loaders))  # skipped in this epoch's pass
        if at_epoch_end() and not stopped:
            if (epoch + 1) % cfg.eval.interval_epochs == 0 or step >= total:
                last_eval = run_eval(cfg.eval.num_pictures if step >= total else 0)
            save({"step": step, "miou": last_eval["miou"] if last_eval else None})
    if stopped:
        save({"step": step})

    wall = time.time() - t_start
    bad_counts = dist.sum_counts(bad_counts)  # skipped samples of every rank, reported once
    if last_eval is None and not stopped:
        last_eval = run_eval(cfg.eval.num_pictures)
    summary = {
        "miou": last_eval["miou"] if last_eval else None,
        "per_class_iou": last_eval["per_class_iou"] if last_eval else None,
        "best_miou": best_miou,
        "evaluated_model": last_eval["model"] if last_eval else None,
        "eval_mode": cfg.eval.mode,
        "steps": step,
        "total_steps": total,
        "stopped_early": stopped,
        "wall_s": wall,
        "train_s": time.time() - t_loop,
        "images_per_s": images_seen * world / max(1e-9, time.time() - t_loop),
        "world_size": world,
        "backend": cfg.engine.backend,
        "method": cfg.method.name,
        "precision": cfg.train.precision,  # as run (train.precision=auto resolved)
        "derived": derived.as_dict(),
        "bad_samples": bad_counts,
        "empty_labeled_batches": dist.sum_counts({"sup_empty": int(meter.totals["sup_empty"])}).get("sup_empty", 0),
        "nonfinite_steps": int(meter.totals["nonfinite"]),  # the same on every rank: ranks skip together
        "val_bad_samples": dist.sum_counts(val_bad),
        "resumed_from": resumed_from,
        "queue_digests": dist.gather_objects(queue_digest(queues)),
    }
    if main:
        if last_eval is not None:
            save_prediction_grid(run_dir / "val_predictions.png", last_eval["pictures"], cfg.data.num_classes)
        write_json_atomic(run_dir / "summary.json", summary)
        if summary["miou"] is not None:
            out.message(f"[u2pl] final {summary['evaluated_model']} mIoU: {100 * summary['miou']:.2f} "
                        f"({summary['steps']} steps, {wall:.0f} s)")
    out.close()
    dist.finish(info)
    return summary

