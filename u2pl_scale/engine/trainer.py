"""The one training function every launcher calls: `train(cfg, hooks)`, a `Trainer` built and run.

Flow: process group -> data streams -> student/teacher -> backend (DDP | DeepSpeed) -> for each step: supervised
warm-up or the U2PL step, optimiser + LR + EMA -> logs every N steps -> eval + checkpoint per epoch -> summary.
Each concern is one method of `Trainer`; the order of their random draws and collectives is the run's contract
(exact resume, identical queues on every rank), so it is spelled out where it matters.
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
from .. import accel
from ..config import Config, derive, queue_capacities, to_yaml
from ..data import stream
from ..data.transforms import normalize
from ..method import diagnostics, ema
from ..method.queues import ClassQueues
from ..model import build_model, convert_sync_bn
from . import checkpoint as ckpt
from .backends import build_backend
from .evaluate import evaluate
from .guard import StepGuard
from .hooks import TrainHooks
from .metering import Meter, method_metrics
from .optim import build_optimizer, build_scheduler, describe_groups
from .outputs import RunOutputs, save_prediction_grid
from ..precision import DTYPES, autocast, configure_cudnn, resolve_precision
from .step import StepConfig, begin_model_step, check_method_mode, model_eager_while_evaluating, supervised_step, \
    u2pl_step


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
    missing = [p for p in local
               if not Path(p).exists() or (Path(p).is_dir() and not (Path(p) / "manifest.json").is_file())]
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


class Trainer:
    """One training run: built from a config (process group, data schedule, models, engine, resume), then run()."""

    def __init__(self, cfg: Config, hooks: TrainHooks | None = None, check_data: bool = True):
        """`check_data=False`: the data sets are neither built nor checked, for a caller that feeds train_step its
        own batches (benchmarks/step_breakdown.py; data.unlabeled_size must then be set)."""
        self.cfg, self.hooks, self.check_data = cfg, hooks or TrainHooks(), check_data
        self.t_start = time.time()
        self._setup_process()
        self._setup_schedule()
        self._build()
        self._resume()
        self.out = RunOutputs(self.run_dir, self.main, self.total, self.step, cfg.train.progress_bar)
        self.out.write_config(to_yaml(cfg))
        self.meter = Meter()
        self.val_bad: dict[str, int] = {}
        self.bad_counts: dict[str, int] = {}
        self.images_seen, self.stopped, self.last_eval = 0, False, None

    # ------------------------------------------------------------------ build
    def _setup_process(self) -> None:
        cfg = self.cfg
        self.info = info = dist.init_distributed(cfg.train.device)
        dist.write_rank_record(cfg.train.run_dir, info)  # {run_dir}/ranks/rank{R}.json: host and rank variables
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        check_method_mode(cfg.train, self.device)
        self.main = self.rank == 0
        requested_precision = cfg.train.precision
        cfg.train.precision = resolve_precision(requested_precision, self.device)  # the resolved config records it
        if self.main and requested_precision == "auto":
            print(f"[u2pl] train.precision=auto: {cfg.train.precision} ({self.device.type} "
                  f"{'with' if cfg.train.precision == 'bf16' else 'without'} native bf16)", flush=True)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.train.num_threads or dist.cpu_threads_per_rank())
        seed_everything(cfg.train.seed + self.rank)

    def _setup_schedule(self) -> None:
        cfg = self.cfg
        if self.check_data:
            ensure_demo_data(cfg)
        unlabeled_size = cfg.data.unlabeled_size or (stream.unlabeled_size(cfg.data.unlabeled) or 0)
        self.derived = derived = derive(cfg, self.world, unlabeled_size)
        self.supervised_only = cfg.method.name == "supervised"
        self.run_dir = Path(cfg.train.run_dir)
        self.total, self.spe = derived.total_steps, derived.steps_per_epoch
        # spec §2, the published EMA start
        self.follow_until = derived.sup_only_steps + cfg.method.teacher_follow_epochs * self.spe
        if self.main:
            print("[u2pl] resolved config:\n" + to_yaml(cfg), flush=True)
            few = diagnostics.few_class_warning(cfg.data.num_classes, cfg.method.contrastive.low_rank)
            if few and cfg.method.name == "u2pl" and cfg.method.contrastive.enabled:
                warnings.warn(f"[u2pl] {few}", stacklevel=3)
            print(f"[u2pl] derived: {derived.as_dict()} (rank source: {self.info.source}, backend: "
                  f"{self.info.backend}, device: {self.device})", flush=True)

    def _build(self) -> None:
        """Student, EMA teacher, optimiser and schedule, engine (DDP | DeepSpeed), queues, step settings, guard."""
        cfg, device = self.cfg, self.device
        configure_cudnn(device, cfg.train.cudnn_benchmark)
        model = build_model(cfg.model, cfg.data.num_classes)
        model = convert_sync_bn(model, cfg.model.sync_bn, device).to(device)
        # DeepSpeed flattens/broadcasts parameters as contiguous byte views, so its weights stay contiguous; inputs
        # are still channels-last, which makes the convolutions run channels-last.
        if cfg.train.channels_last and cfg.engine.backend != "deepspeed":
            model = model.to(memory_format=torch.channels_last)
        self.teacher = teacher = copy.deepcopy(model)
        for p in teacher.parameters():
            p.requires_grad_(False)
        # without SyncBatchNorm each rank's teacher would keep its own BN statistics (its pseudo-labels, the saved
        # and the evaluated teacher would differ by rank): they are averaged after every update instead
        self.average_teacher_stats = self.world > 1 and dist.has_local_batchnorm(teacher)
        optimizer = build_optimizer(model, cfg.optim, self.derived.lr, device)
        if self.main:
            print(f"[u2pl] parameter groups: {describe_groups(optimizer)}", flush=True)
        scheduler = build_scheduler(optimizer, self.total, cfg.optim.poly_power)
        self.backend = backend = build_backend(cfg, model, optimizer, scheduler, device)
        self.student, self.module = backend.forward_model, backend.module
        if cfg.train.compile:
            # nn.Module.compile compiles forward in place, so state_dict keys (checkpoints, EMA) are unchanged
            self.module.compile(mode=cfg.train.compile_mode)
            teacher.compile(mode=cfg.train.compile_mode)
        c = cfg.method.contrastive
        stages = accel.select(device, compiled=cfg.train.compile_method and cfg.train.compile_method_mode !=
                              "cuda-graph", implementation=cfg.train.method_implementation)
        self.queues = ClassQueues(cfg.data.num_classes, cfg.model.rep_dim, queue_capacities(cfg), device=device,
                                  dtype=DTYPES[{"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[
                                      c.queue_dtype]], exchange_fraction=c.exchange_fraction,
                                  write=stages.queue_write)
        self.sc = StepConfig.from_config(cfg, stages)
        self.generator = None  # the global (per-rank seeded, checkpointed) RNG drives CutMix and sampling
        self.guard = StepGuard((self.module, teacher), optimizer, device, self.world,
                               cfg.train.max_consecutive_nonfinite, history=cfg.train.log_interval)

    def autocast_ctx(self):
        return autocast(self.cfg.train.precision, self.device)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        self.step, self.semi_started, self.steps_since_copy, self.best_miou = 0, False, 0, -1.0
        self.resumed_from = None
        path = ckpt.resolve_resume(self.cfg.train.resume, self.run_dir)
        if path is None:
            return
        state, rng = ckpt.load_checkpoint(path)
        self.module.load_state_dict(state["model"])
        self.teacher.load_state_dict(state["teacher"])
        self.backend.load_state_dict(state["backend"], path)
        self.queues.load_state_dict(state["queues"])
        self.step, self.semi_started = int(state["step"]), bool(state["semi_started"])
        self.steps_since_copy, self.best_miou = int(state["steps_since_copy"]), float(state["best_miou"])
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.resumed_from = str(path)
        if self.main:
            print(f"[u2pl] resumed from {path} at step {self.step}", flush=True)
            saved_world, world = int(state.get("world_size", self.world)), self.world
            if saved_world != world:
                print(f"[u2pl] the checkpoint was written by {saved_world} rank(s), this run has {world}: weights, "
                      f"teacher, queues and optimiser carry over; the data order, the per-rank randomness and the "
                      f"schedule (steps per epoch, total steps) are this world size's, so the run is not the one "
                      f"{saved_world} rank(s) would have continued", flush=True)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "teacher": self.teacher.state_dict(),
                "backend": self.backend.state_dict(), "queues": self.queues.state_dict(), "step": self.step,
                "semi_started": self.semi_started, "steps_since_copy": self.steps_since_copy,
                "best_miou": self.best_miou, "config": to_yaml(self.cfg), "world_size": self.world,
                "meta": ckpt.checkpoint_meta(self.cfg, "teacher" if self.semi_started else "student", self.step)}

    def save(self, metrics: dict) -> Path:
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.state_dict(), keep=self.cfg.train.keep_checkpoints,
                                    extra_writer=self.backend.save_extra, device=self.device)
        with ckpt.rng_preserved():
            self.hooks.on_checkpoint(self.step, str(path), metrics)
        return path

    # ------------------------------------------------------------------ evaluation
    def prepare(self, batch: dict, with_label: bool = True):
        cfg = self.cfg
        image = normalize(batch["image"].to(self.device, non_blocking=True), cfg.data.mean, cfg.data.std,
                          cfg.train.channels_last)
        label = batch["label"].to(self.device, non_blocking=True).long() if with_label else None
        return image, label

    def run_eval(self, keep_pictures: int = 0) -> dict:
        cfg = self.cfg
        eval_model = self.teacher if self.semi_started else self.module
        dist.broadcast_buffers_(eval_model)  # the figure is that of the model rank 0 saves
        val_loader = stream.make_val_loader(cfg.data, self.rank, self.world)
        with model_eager_while_evaluating(self.sc):
            result = evaluate(eval_model, val_loader, self.prepare, cfg.data.num_classes, cfg.data.ignore_index,
                              cfg.eval.mode, cfg.eval.crop_size, cfg.eval.stride_rate, self.autocast_ctx,
                              keep_pictures, cfg.data.batch_size_val)
        result["model"] = "teacher" if self.semi_started else "student"
        self.val_bad.update(result["bad_samples"])  # the last eval's skipped val samples (each eval reads the set)
        if result["miou"] > self.best_miou:
            self.best_miou = result["miou"]
            if self.main:
                with atomic_path(self.run_dir / "best.pt") as tmp:
                    torch.save({"model": eval_model.state_dict(), "step": self.step, "miou": self.best_miou,
                                "meta": ckpt.checkpoint_meta(cfg, result["model"], self.step)}, tmp)
        self.out.log(self.step, {"miou": result["miou"], "best_miou": self.best_miou}, prefix="val")
        self.out.message(f"[u2pl] step {self.step}: {result['model']} mIoU {100 * result['miou']:.2f} "
                         f"({result['eval_mode']})")
        return result

    # ------------------------------------------------------------------ training
    def run(self) -> dict:
        self.t_loop = self.t_log = time.time()
        while self.step < self.total and not self.stopped:
            epoch, start_in_epoch = divmod(self.step, self.spe)
            self._run_epoch(epoch, start_in_epoch)
            if self._at_epoch_end() and not self.stopped:
                if (epoch + 1) % self.cfg.eval.interval_epochs == 0 or self.step >= self.total:
                    self.last_eval = self.run_eval(self.cfg.eval.num_pictures if self.step >= self.total else 0)
                self.save({"step": self.step, "miou": self.last_eval["miou"] if self.last_eval else None})
        if self.stopped:
            self.save({"step": self.step})
        return self._finish()

    def _at_epoch_end(self) -> bool:
        return self.step % self.spe == 0 or self.step >= self.total

    def _loaders(self, epoch: int, start_in_epoch: int) -> list:
        cfg = self.cfg
        steps_this_epoch = min(self.spe, start_in_epoch + (self.total - self.step))
        sets = [("labeled", cfg.data.batch_size_labeled)]
        if not self.supervised_only:
            sets.append(("unlabeled", cfg.data.batch_size_unlabeled))
        return [stream.make_train_loader(cfg.data, name, batch, self.rank, self.world, cfg.train.seed, epoch,
                                         steps_this_epoch, start_in_epoch) for name, batch in sets]

    def _run_epoch(self, epoch: int, start_in_epoch: int) -> None:
        cfg = self.cfg
        loaders = self._loaders(epoch, start_in_epoch)
        progress = epoch / cfg.train.epochs
        batches = zip(*loaders) if len(loaders) == 2 else ((b, None) for b in loaders[0])
        for batch_l, batch_u in batches:
            terms, semi = self.train_step(batch_l, batch_u, progress)
            if self.step % cfg.train.log_interval == 0 or self.step == self.total:
                self._log(terms, epoch, semi, progress, loaders)
            # an epoch end is saved by run(), after the evaluation
            if cfg.train.checkpoint_interval and self.step % cfg.train.checkpoint_interval == 0 \
                    and not self._at_epoch_end():
                self.save({"step": self.step})
            # ranks must agree to stop at the same step (the checkpoint is collective): ask on log steps only
            if self.step % cfg.train.log_interval == 0 and dist.any_rank(self.hooks.should_stop(), self.device):
                self.stopped = True
                break
            if self.step >= self.total:
                break
        self.bad_counts = dist.add_counts(self.bad_counts, *(ld.bad_counts for ld in loaders))  # this pass's skips

    def train_step(self, batch_l: dict, batch_u: dict | None, progress: float) -> tuple[dict, bool]:
        """One step: the supervised warm-up or the U2PL step, backward and optimiser (skipped when not finite), the
        EMA teacher, the counters. Returns the step's terms (device tensors) and whether it was semi-supervised."""
        cfg, step, guard, teacher, module = self.cfg, self.step, self.guard, self.teacher, self.module
        begin_model_step(self.sc)
        x_l, y_l = self.prepare(batch_l)
        semi = not self.supervised_only and step >= self.derived.sup_only_steps
        if semi and not self.semi_started:
            # spec §2: the teacher starts as the student; as rank 0's student (DDP's buffers are rank 0's, and
            # rank 0's are what a checkpoint holds), so a run resumed at this point starts the same teacher
            dist.broadcast_buffers_(module)
            ema.copy_(teacher, module)
            self.semi_started, self.steps_since_copy = True, 0
        guard.begin(step, batch_l["key"] + (batch_u["key"] if semi else []))  # after the copy: what a skip keeps
        if semi:
            x_u, _ = self.prepare(batch_u, with_label=False)
            valid_u = batch_u["valid"].to(self.device, non_blocking=True)
            logging_next = (step + 1) % cfg.train.log_interval == 0 or step + 1 == self.total
            terms = u2pl_step(self.sc, self.student, teacher, self.queues, x_l, y_l, x_u, valid_u, progress,
                              self.autocast_ctx, self.generator, diagnose=logging_next)
            self.images_seen += x_l.shape[0] + x_u.shape[0]
        else:
            terms = supervised_step(self.sc, self.student, x_l, y_l, self.autocast_ctx)
            self.images_seen += x_l.shape[0]
        self.backend.backward_and_step(terms["loss"], guard)
        terms["nonfinite"] = guard.bad.float()
        if semi:
            if guard.skip_on_host():
                pass  # a skipped step leaves the teacher (engine/guard.py)
            elif step < self.follow_until:
                ema.follow_(teacher, module)  # the student did not move on a skipped step: a no-op then
            else:
                ema.update_(teacher, module, self.steps_since_copy, cfg.method.ema_decay, gate=guard.ema_gate())
            self.steps_since_copy += 1
        guard.end(step)  # before the teacher's statistics are averaged: a skipped step's are put back first
        if semi and self.average_teacher_stats:
            dist.average_running_stats_(teacher)
        self.meter.add(terms)
        self.step += 1
        self.out.advance()
        return terms, semi

    def _log(self, terms: dict, epoch: int, semi: bool, progress: float, loaders: list) -> None:
        cfg, now = self.cfg, time.time()
        metrics = self.meter.read()  # the one host read, on logging steps only
        metrics.update(lr=self.backend.lr, epoch=epoch, phase="u2pl" if semi else "sup-only",
                       images_per_s=self.images_seen * self.world / max(1e-9, now - self.t_loop),
                       step_s=(now - self.t_log) / cfg.train.log_interval)
        if semi:
            metrics.update(method_metrics(terms, self.queues, progress, cfg, self.world))
        skipped = dist.add_counts(self.bad_counts, *(ld.bad_counts for ld in loaders))  # this epoch's so far
        if skipped:
            metrics["bad_samples"] = skipped
        self.t_log = now
        self.out.log(self.step, metrics)
        with ckpt.rng_preserved():
            self.hooks.on_log(self.step, metrics)
        self.guard.stop_if_exhausted(self.run_dir, say=self.out.message)

    # ------------------------------------------------------------------ the end
    def _finish(self) -> dict:
        cfg = self.cfg
        wall = time.time() - self.t_start
        bad_counts = dist.sum_counts(self.bad_counts)  # skipped samples of every rank, reported once
        if self.last_eval is None and not self.stopped:
            self.last_eval = self.run_eval(cfg.eval.num_pictures)
        last = self.last_eval
        summary = {
            "miou": last["miou"] if last else None,
            "per_class_iou": last["per_class_iou"] if last else None,
            "best_miou": self.best_miou,
            "evaluated_model": last["model"] if last else None,
            "eval_mode": cfg.eval.mode,
            "steps": self.step,
            "total_steps": self.total,
            "stopped_early": self.stopped,
            "wall_s": wall,
            "train_s": time.time() - self.t_loop,
            "images_per_s": self.images_seen * self.world / max(1e-9, time.time() - self.t_loop),
            "world_size": self.world,
            "backend": cfg.engine.backend,
            "method": cfg.method.name,
            "precision": cfg.train.precision,  # as run (train.precision=auto resolved)
            "derived": self.derived.as_dict(),
            "bad_samples": bad_counts,
            "empty_labeled_batches": dist.sum_counts({"sup_empty": int(self.meter.totals["sup_empty"])}).get(
                "sup_empty", 0),
            "nonfinite_steps": int(self.meter.totals["nonfinite"]),  # the same on every rank: ranks skip together
            "val_bad_samples": dist.sum_counts(self.val_bad),
            "resumed_from": self.resumed_from,
            "queue_digests": dist.gather_objects(queue_digest(self.queues)),
        }
        if self.main:
            if last is not None:
                save_prediction_grid(self.run_dir / "val_predictions.png", last["pictures"], cfg.data.num_classes)
            write_json_atomic(self.run_dir / "summary.json", summary)
            if summary["miou"] is not None:
                self.out.message(f"[u2pl] final {summary['evaluated_model']} mIoU: {100 * summary['miou']:.2f} "
                                 f"({summary['steps']} steps, {wall:.0f} s)")
        self.out.close()
        dist.finish(self.info)
        return summary


def train(cfg: Config, hooks: TrainHooks | None = None) -> dict:
    """Build a Trainer from `cfg` and run it to the end (or to a stop its hooks ask for); returns the summary."""
    return Trainer(cfg, hooks).run()
