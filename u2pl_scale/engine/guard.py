"""Non-finite steps: a step whose loss or gradients are not finite changes nothing, is counted, and N such steps in
a row stop the run, naming the steps, their samples and the last good checkpoint.

What a skipped step leaves as it was: the student's weights and optimiser state (no optimiser step; the LR
schedule still advances, as the step count does), the teacher (no EMA update), and both models' BatchNorm running
statistics (the forwards moved them; they are put back). The negative queues never take a non-finite row
(`ClassQueues` drops such rows when it pushes): their rows are the teacher's features, which do not depend on the
student, so a step whose non-finite value arose in the student's loss or gradients still pushes its finite rows.

The decision is one device flag per step (loss or gradient norm not finite, max over ranks: after DDP's all-reduce
the gradients agree, the losses need one 1-element all-reduce), so ranks always skip together. Where the
optimiser is fused (the default on CUDA) the flag goes to the fused kernel as `found_inf`, the mechanism
GradScaler uses, and the EMA weight is multiplied by it: no host read in the step. Elsewhere (CPU, where there is no
device to wait for; DeepSpeed, whose step does its own host reads) the flag is read on the host. Counters stay on
the device and are read on log steps; `train.max_consecutive_nonfinite` (0: never stop) is checked there.
"""
from __future__ import annotations

import collections
from typing import Iterable, Optional

import torch

from .. import dist


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when `train.max_consecutive_nonfinite` steps in a row were not finite."""


class StepGuard:
    def __init__(self, modules: Iterable[torch.nn.Module], optimizer, device: torch.device, world_size: int,
                 max_consecutive: int, history: int):
        self.device, self.world_size, self.max_consecutive = device, world_size, max_consecutive
        buffers = [b for m in modules for b in m.buffers()]
        self.float_buffers = [b for b in buffers if b.is_floating_point()]
        self.int_buffers = [b for b in buffers if not b.is_floating_point()]  # num_batches_tracked
        self.device_side = device.type == "cuda" and _is_fused(optimizer)
        if self.device_side:
            _materialise_momentum(optimizer)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.run = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps in a row, now
        self.hit_step = torch.full((), -1, dtype=torch.long, device=device)  # where the run first reached N
        self.keys: collections.deque = collections.deque(maxlen=history + max(max_consecutive, 1))
        self._shadow: Optional[tuple] = None

    # ------------------------------------------------------------------ per step
    def begin(self, step: int, keys) -> None:
        """Before the step's forwards: remember the BN statistics they will move, and the batch's sample keys."""
        self.keys.append((step, list(keys)))
        self._shadow = tuple(torch.cat([b.reshape(-1) for b in group]) if group else None
                             for group in (self.float_buffers, self.int_buffers))

    def check(self, loss: torch.Tensor, parameters: Optional[Iterable[torch.nn.Parameter]]) -> torch.Tensor:
        """After the backward: the step's flag (True = skip), the same on every rank. With `parameters` None only the
        loss is checked (DeepSpeed's partitioned gradients; GradScaler's own inf check under fp16)."""
        bad = ~torch.isfinite(loss.detach().float())
        grads = [p.grad for p in parameters if p.grad is not None] if parameters is not None else []
        if grads:
            bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).float().sum())
        if self.world_size > 1:
            flag = bad.float().reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag[0] > 0
        self.bad = bad
        return bad

    def skip_on_host(self) -> bool:
        """Whether the caller must branch on the host (False on the device-side path, where nothing is read)."""
        return not self.device_side and bool(self.bad)

    def optimizer_step(self, optimizer) -> None:
        """optimizer.step(), skipped when the flag is set: by the fused kernel's found_inf, or on the host."""
        if self.device_side:
            optimizer.grad_scale, optimizer.found_inf = None, self.bad.float()
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif not bool(self.bad):
            optimizer.step()

    def ema_gate(self) -> Optional[torch.Tensor]:
        """For the EMA update: None on the host path (the caller skips the update of a bad step), else a device
        factor for its weight, 0 on a bad step."""
        return (~self.bad).float() if self.device_side else None

    def end(self, step: int) -> None:
        """After the step's updates (step = the step just taken, 0-based): put back the BN statistics of a skipped
        step, and update the counters."""
        for group, shadow in zip((self.float_buffers, self.int_buffers), self._shadow or ()):
            if shadow is not None:
                kept = torch.where(self.bad, shadow, torch.cat([b.reshape(-1) for b in group]))
                torch._foreach_copy_(group, [part.view_as(b) for part, b in
                                             zip(kept.split([b.numel() for b in group]), group)])
        self._shadow = None
        self.run = (self.run + 1) * self.bad
        if self.max_consecutive > 0:
            reached = (self.run >= self.max_consecutive) & (self.hit_step < 0)
            self.hit_step = torch.where(reached, torch.full_like(self.hit_step, step), self.hit_step)

    # ------------------------------------------------------------------ on log steps
    def stop_if_exhausted(self, run_dir, say=print) -> None:
        """On a log step (a host read): raise NonFiniteLossError once `max_consecutive` steps in a row were skipped."""
        hit = int(self.hit_step)
        if hit < 0:
            return
        from .checkpoint import latest_complete

        first = hit - self.max_consecutive + 1
        keys = [k for s, ks in self.keys if first <= s <= hit for k in ks]
        last = latest_complete(f"{run_dir}/checkpoints", say=lambda *_: None)
        message = (f"{self.max_consecutive} steps in a row had a non-finite loss or gradients (steps {first + 1}.."
                   f"{hit + 1}, each skipped); stopping. Samples of those steps on rank {dist.get_rank()}: "
                   f"{', '.join(keys) or '(none recorded)'}. Last good checkpoint: {last or 'none'} "
                   f"(continue from it with train.resume=auto after fixing the cause, e.g. a lower optim.lr; "
                   f"train.max_consecutive_nonfinite sets N, 0 never stops)")
        say(f"[u2pl] {message}")
        raise NonFiniteLossError(message)


def _is_fused(optimizer) -> bool:
    return any(group.get("fused") for group in getattr(optimizer, "param_groups", []))


def _materialise_momentum(optimizer) -> None:
    """SGD creates its momentum buffers at the first step that runs; a first step skipped through found_inf would
    leave them uninitialised. A zero buffer gives the same first step (buf = momentum * 0 + grad, dampening 0)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] and not group.get("dampening"):
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
