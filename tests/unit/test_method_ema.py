"""EMA teacher against hand values and a hand loop (U2PL_SPEC.md section 2)."""

import pytest
import torch
from torch import nn

from u2pl_scale.method.ema import copy_, decay_at, update_


def make_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_decay_sequence_hand_values():
    assert [decay_at(k) for k in range(4)] == pytest.approx([0.0, 1 / 2, 2 / 3, 3 / 4])
    assert decay_at(49) == pytest.approx(0.98) and decay_at(99) == pytest.approx(0.99)
    assert decay_at(5000) == 0.99 and decay_at(3, ema_decay=0.5) == 0.5


def test_copy_takes_parameters_and_buffers():
    teacher, student = make_net(0), make_net(1)
    student[1].running_mean.fill_(3.0)
    copy_(teacher, student)
    for t, s in zip(list(teacher.parameters()) + list(teacher.buffers()),
                    list(student.parameters()) + list(student.buffers())):
        assert torch.equal(t, s)


def test_updates_match_hand_loop_and_leave_buffers_alone():
    teacher, student = make_net(0), make_net(1)
    copy_(teacher, student)
    expected = [p.detach().clone() for p in teacher.parameters()]
    teacher[1].running_mean.fill_(7.0)  # teacher BN stats come from its own forwards
    decays = []
    for step in range(5):  # step = updates since the copy, as the trainer counts them
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * (step + 1))
        decays.append(update_(teacher, student, step, 0.6))
        d = min(1 - 1 / (step + 1), 0.6)
        expected = [d * e + (1 - d) * s.detach() for e, s in zip(expected, student.parameters())]
    assert decays == pytest.approx([0.0, 0.5, 0.6, 0.6, 0.6])
    for t, e in zip(teacher.parameters(), expected):
        assert torch.allclose(t, e, atol=1e-6)
    assert torch.all(teacher[1].running_mean == 7.0)


def test_update_returns_decay_and_rejects_mismatched_models():
    teacher, student = make_net(0), make_net(1)
    assert update_(teacher, student, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="parameters"):
        update_(teacher, nn.Linear(3, 4), 0)


def test_follow_copies_parameters_exactly_and_keeps_the_teachers_statistics():
    import torch.nn as nn
    from u2pl_scale.method import ema
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student[1].running_mean.fill_(0.5)
    teacher_stats = teacher[1].running_mean.clone()
    ema.follow_(teacher, student)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()  # equal values, not shared storage
    assert torch.equal(teacher[1].running_mean, teacher_stats)
