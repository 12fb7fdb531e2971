"""Finds host synchronisations in device code without a GPU: the code runs on the "meta" device (no data, so any
read of a value - .item(), bool(), nonzero, boolean indexing - raises) under modes that also record every op that
would synchronise a CUDA stream or copy host data to the device on each call.

Recorded: `aten._local_scalar_dense` (item/bool/int of a tensor), nonzero, masked_select, unique*, boolean-mask
indexing, repeat_interleave without output_size, blocking host-to-device copies, and torch.tensor / as_tensor
calls that build a device tensor from host data. Each finding is (op, innermost u2pl_scale frame).
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_VALUE_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                "unique_consecutive", "unique_dim", "equal", "is_nonzero", "item"}


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if "u2pl_scale" in f.filename]
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{frame.filename.split('u2pl_scale/')[-1]}:{frame.lineno} {frame.line}"


class _Recorder:
    """Mode mixin: findings go to a list shared by the audit's modes."""

    def __init__(self, found: list):
        super().__init__()
        self.found = found


class _Dispatch(_Recorder, TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        bad = name in _VALUE_READS
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            bad = any(i is not None and i.dtype == torch.bool for i in args[1])
        elif name == "repeat_interleave":
            bad = kwargs.get("output_size") is None and len(args) < 4
        elif name in ("_to_copy", "copy_"):
            src = args[0] if name == "_to_copy" else args[1]
            dst = kwargs.get("device") if name == "_to_copy" else args[0].device
            blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True))
            bad = (isinstance(src, torch.Tensor) and dst is not None and src.device.type == "cpu"
                   and torch.device(dst).type != "cpu" and blocking)
        if bad:
            self.found.append((str(func), _where()))
        return func(*args, **kwargs)


class _Function(_Recorder, TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device).type != "cpu"
                and not (args and isinstance(args[0], torch.Tensor))):
            self.found.append((f"torch.{func.__name__} of host data onto the device", _where()))
        return func(*args, **kwargs)


class SyncAudit:
    """`with SyncAudit() as audit: ...` then `audit.found` lists the syncs (op, where)."""

    def __init__(self):
        self.found: list[tuple[str, str]] = []
        self._modes = (_Function(self.found), _Dispatch(self.found))

    def __enter__(self) -> "SyncAudit":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
