"""Atomic, resumable checkpoints.

Layout: run_dir/checkpoints/step_XXXXXXXX/ holding state.pt (model, teacher, optimizer, scheduler, scaler, queues,
counters), rng_rank{r}.pt (each rank's RNG) and, under DeepSpeed, the engine's own files in deepspeed/.
A checkpoint is written into a hidden temporary directory and renamed into place when complete, so a crash never
leaves a half-written checkpoint where resume looks. Loading uses torch.load(weights_only=True): no pickles.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str, run_dir: str | Path) -> Optional[Path]:
    """"" -> None; "auto" -> latest checkpoint in run_dir (or None); a path -> that checkpoint directory
    (a step directory, or a directory whose latest step directory is taken, e.g. a Ray checkpoint)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(Path(run_dir) / "checkpoints")
        return found[-1] if found else None
    p = Path(resume)
    if (p / "state.pt").is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        found = list_checkpoints(candidate)
        if found:
            return found[-1]
    raise FileNotFoundError(f"train.resume: no checkpoint (state.pt) found at {p}")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import ast
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(ast.literal_eval(state["python"])))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(obj):
    return tuple(_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2, extra_writer=None) -> Path:
    """Collective: every rank calls it. Rank 0 writes `state`; every rank writes its RNG; `extra_writer(tmp_dir)`
    (e.g. DeepSpeed's save_checkpoint) runs on every rank. Returns the final directory."""
    root = Path(run_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
    if extra_writer is not None:
        extra_writer(tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path) -> tuple[dict, Optional[dict]]:
    """(state, this rank's rng state or None when the checkpoint came from fewer ranks)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return state, rng


META_FORMAT = "u2pl-scale/1"


def checkpoint_meta(cfg, evaluated_model: str, step: int) -> dict:
    """What a checkpoint needs to be used on its own (u2pl_scale/inference): the model's config, the classes, the
    normalisation, which network was evaluated and the training config as YAML. Plain types only, so the file
    loads with torch.load(weights_only=True)."""
    import dataclasses

    from ..config import to_yaml

    return {
        "format": META_FORMAT,
        "model": dataclasses.asdict(cfg.model),
        "num_classes": int(cfg.data.num_classes),
        "class_names": list(cfg.data.class_names) if cfg.data.class_names else None,
        "ignore_index": int(cfg.data.ignore_index),
        "mean": [float(v) for v in cfg.data.mean],
        "std": [float(v) for v in cfg.data.std],
        "evaluated_model": evaluated_model,
        "step": int(step),
        "eval": dataclasses.asdict(cfg.eval),
        "precision": cfg.train.precision,
        "channels_last": bool(cfg.train.channels_last),
        "config": to_yaml(cfg),
    }
