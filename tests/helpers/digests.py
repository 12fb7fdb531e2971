"""Digests of checkpoint contents, to compare runs bit for bit (tests of exact resume)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

PARTS = ("model", "teacher", "queues", "backend")  # weights, EMA teacher, class queues, optimiser + schedule


def _feed(h, x) -> None:
    if isinstance(x, torch.Tensor):
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        if x.numel():
            h.update(x.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)
                     .view(torch.uint8).numpy().tobytes())
    elif isinstance(x, dict):
        for key in sorted(x, key=str):
            h.update(str(key).encode())
            _feed(h, x[key])
    elif isinstance(x, (list, tuple)):
        for item in x:
            _feed(h, item)
    else:
        h.update(repr(x).encode())


def state_digests(state_file: Path) -> dict:
    """{part: sha256} of a checkpoint's state.pt for each of PARTS."""
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    out = {}
    for part in PARTS:
        h = hashlib.sha256()
        _feed(h, state[part])
        out[part] = h.hexdigest()
    return out


def logged(run_dir: Path, after_step: int = 0) -> list[dict]:
    """metrics.jsonl records after `after_step`, without the wall-clock fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "step_s")} for r in rows
            if r["step"] > after_step]
