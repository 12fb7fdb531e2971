"""Two engines behind one interface: torch DDP and a DeepSpeed engine (engine.backend).

Both keep fp32 parameters and use autocast for mixed precision (DeepSpeed's own fp16/bf16 modes cast parameters,
which breaks SyncBatchNorm and the EMA teacher). The teacher, queues and EMA see the plain module either way.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import dist
from ..precision import grad_scaler


def ordered_allreduce_hook(group, bucket):
    """DDP comm hook for gloo ranks at W > 2: the bucket gathered from every rank and summed in rank order, then
    averaged. gloo's ring all-reduce adds the ranks' values in an order that depends on an element's offset in the
    bucket, and DDP lays its buckets out anew after the first step of every process, so the first step after a
    resume would sum some gradients in another order than the uninterrupted run (a last-bit difference that grows).
    Here each element's sum is (((g0 + g1) + g2) + ...) wherever it sits: resume stays exact. CPU runs only: it
    moves W times the bytes of an all-reduce (with 2 ranks the sum is order-free and the default hook is kept)."""
    import torch.distributed as tdist

    tensor = bucket.buffer()  # a flat bucket
    world = tdist.get_world_size(group)
    gathered = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor  # renamed in torch 2.1x
    work = gather(gathered, tensor, group=group, async_op=True)

    def average(_):
        parts = gathered.view(world, -1)
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        return total.div_(world)

    return work.get_future().then(average)


class DDPBackend:
    name = "ddp"

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, device: torch.device, precision: str,
                 grad_clip: float = 0.0, find_unused_parameters: bool = False):
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.scaler = grad_scaler(precision, device)
        if dist.is_dist():
            ids = [device.index] if device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(model, device_ids=ids,
                                                         find_unused_parameters=find_unused_parameters)
            if device.type == "cpu" and dist.get_world_size() > 2 and not getattr(self.forward_model,
                                                                                   "_comm_hooks", None):
                self.forward_model.register_comm_hook(None, ordered_allreduce_hook)
        else:
            self.forward_model = model

    def backward_and_step(self, loss: torch.Tensor, guard=None) -> None:
        """Backward (DDP all-reduces the gradients), then the optimiser and LR steps; with a StepGuard
        (engine/guard.py) a step whose loss or gradients are not finite leaves the weights and optimiser state."""
        self.scaler.scale(loss).backward()
        if guard is not None:  # under fp16 GradScaler finds and skips non-finite gradients itself: the loss only
            guard.check(loss, None if self.scaler.is_enabled() else self.module.parameters())
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip, foreach=True)
        if guard is None or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
        else:
            guard.optimizer_step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, ckpt_dir: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save_extra(self, tmp_dir: Path) -> None:
        """DDP keeps everything in state.pt."""

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class DeepSpeedBackend:
    """A DeepSpeed engine with ZeRO stage 0/1/2, gradient clipping and its own checkpoint files."""
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, device: torch.device, precision: str,
                 grad_clip: float, zero_stage: int, batch_per_rank: int):
        import os
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("engine.backend=deepspeed needs a process group; start with launchers/local.py, "
                               "torchrun, Slurm or Ray")
        if precision == "fp16":
            raise ValueError("train.precision=fp16 with engine.backend=deepspeed is not supported: DeepSpeed's fp16 "
                             "mode casts parameters (breaks SyncBatchNorm and the EMA teacher); use bf16 or fp32")
        config = {
            "train_micro_batch_size_per_gpu": batch_per_rank,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(grad_clip),
            "zero_optimization": {"stage": int(zero_stage)},
            # ZeRO 1/2 shard any torch optimizer's state; DeepSpeed only whitelists its own and Adam variants
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.module = self.engine.module
        self.forward_model = self.engine
        self.scaler = None

    def backward_and_step(self, loss: torch.Tensor, guard=None) -> None:
        """With a StepGuard the loss is checked first (ZeRO's gradients are partitioned, not on the parameters): a
        non-finite one skips the backward and the optimiser step on every rank; the LR schedule still advances."""
        if guard is not None and guard.check(loss, None).item():
            self.engine.zero_grad()
            self.scheduler.step()
            return
        self.engine.backward(loss)
        self.engine.step()  # optimizer step, zero grad and LR scheduler step

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, ckpt_dir: Path) -> None:
        self.engine.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="engine", load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)

    def save_extra(self, tmp_dir: Path) -> None:
        self.engine.save_checkpoint(str(tmp_dir / "deepspeed"), tag="engine")

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]


def build_backend(cfg, model, optimizer, scheduler, device):
    if cfg.engine.backend == "deepspeed":
        return DeepSpeedBackend(model, optimizer, scheduler, device, cfg.train.precision, cfg.engine.grad_clip,
                                cfg.engine.zero_stage, cfg.data.batch_size_labeled)
    return DDPBackend(model, optimizer, scheduler, device, cfg.train.precision, cfg.engine.grad_clip,
                      cfg.engine.find_unused_parameters)
