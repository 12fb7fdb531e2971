"""The EMA teacher (U2PL_SPEC.md section 2).

At the first semi-supervised step the teacher gets the student's parameters and buffers (`copy_`). After each
optimiser step `update_` sets teacher = decay * teacher + (1 - decay) * student over PARAMETERS only, with
decay = min(1 - 1/(k + 1), ema_decay) and k the number of updates since the copy (0, 1/2, 2/3, ... capped at
0.99). Buffers (BN running statistics) are not averaged: the teacher's come from its own train-mode forwards, as in
the published code. Pass the unwrapped modules (not DDP wrappers) so both sides list the same parameters.
For `teacher_follow_epochs` after the copy the published code keeps re-copying the parameters (`follow_`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def decay_at(steps_since_copy: int, ema_decay: float = 0.99) -> float:
    """decay = min(1 - 1/(k + 1), ema_decay) for k = steps_since_copy (0 at the first semi-supervised step)."""
    return min(1.0 - 1.0 / (steps_since_copy + 1), ema_decay)


def _paired(teacher_tensors, student_tensors, what: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    teacher_list, student_list = list(teacher_tensors), list(student_tensors)
    if len(teacher_list) != len(student_list):
        raise ValueError(f"EMA teacher and student differ in {what}: {len(teacher_list)} vs {len(student_list)}")
    return teacher_list, student_list


@torch.no_grad()
def copy_(teacher: nn.Module, student: nn.Module) -> None:
    """teacher <- student for parameters and buffers (first semi-supervised step)."""
    teacher_buffers, student_buffers = _paired(teacher.buffers(), student.buffers(), "buffers")
    follow_(teacher, student)
    if teacher_buffers:
        torch._foreach_copy_(teacher_buffers, student_buffers)


@torch.no_grad()
def follow_(teacher: nn.Module, student: nn.Module) -> None:
    """teacher <- student for parameters only, exactly (the published first semi-supervised epoch, in which the
    teacher's parameters are the student's while its BN statistics stay its own)."""
    teacher_params, student_params = _paired(teacher.parameters(), student.parameters(), "parameters")
    if teacher_params:
        torch._foreach_copy_(teacher_params, student_params)


@torch.no_grad()
def update_(teacher: nn.Module, student: nn.Module, steps_since_copy: int, ema_decay: float = 0.99,
            gate: Optional[torch.Tensor] = None) -> float:
    """One EMA step over parameters (one fused foreach lerp); returns the decay used. `gate`, a device scalar,
    multiplies the step's weight (0: the teacher stays, without a host read: engine/guard.py)."""
    decay = decay_at(steps_since_copy, ema_decay)
    teacher_params, student_params = _paired(teacher.parameters(), student.parameters(), "parameters")
    if teacher_params:
        # lerp: t + (1 - decay) * (s - t) == decay * t + (1 - decay) * s
        if gate is None:
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - decay)
        else:  # the same sum, spelled out: a tensor lerp weight is read on the host (.item())
            step = torch._foreach_sub(student_params, teacher_params)
            torch._foreach_mul_(step, (1.0 - decay) * gate)
            torch._foreach_add_(teacher_params, step)
    return decay
