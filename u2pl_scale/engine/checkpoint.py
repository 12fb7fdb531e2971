"""Atomic, resumable checkpoints.

Layout: run_dir/checkpoints/step_XXXXXXXX/ holding state.pt (model, teacher, optimizer, scheduler, scaler, queues,
counters), rng_rank{r}.pt (each rank's RNG) and, under DeepSpeed, the engine's own files in deepspeed/.
A checkpoint is written into a hidden temporary directory, listed with every file's size in complete.json, synced
and renamed into place, so a crash never leaves a half-written checkpoint where resume looks; a write that fails
(no space, permissions) removes its temporary directory on every rank and leaves the previous checkpoints as they
were. resume=auto takes the newest checkpoint whose files match its complete.json and says why it skipped any
newer one. Loading uses torch.load(weights_only=True): no pickles.
"""
from __future__ import annotations

import contextlib
import json
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


COMPLETE = "complete.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous checkpoints are untouched."""


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def incomplete_reason(path: Path) -> Optional[str]:
    """None when every file complete.json lists is there with its size; else what is wrong. A checkpoint from
    before complete.json existed is taken as it is."""
    listing = path / COMPLETE
    if not listing.is_file():
        return None
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE} ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, {COMPLETE} says {size}"
    return None


def latest_complete(ckpt_root: str | Path, say=print) -> Optional[Path]:
    """The newest checkpoint under ckpt_root whose files are complete; each newer one skipped is reported."""
    for path in reversed(list_checkpoints(ckpt_root)):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        say(f"[u2pl] resume: skipping checkpoint {path}: {reason}")
    return None


def resolve_resume(resume: str, run_dir: str | Path) -> Optional[Path]:
    """"" -> None; "auto" -> the newest complete checkpoint in run_dir (or None); a path -> that checkpoint
    directory (a step directory, or a directory whose newest complete step directory is taken, e.g. a Ray
    checkpoint)."""
    if not resume:
        return None
    say = print if dist.get_rank() == 0 else (lambda *_: None)
    if resume == "auto":
        return latest_complete(Path(run_dir) / "checkpoints", say)
    p = Path(resume)
    if (p / "state.pt").is_file():
        reason = incomplete_reason(p)
        if reason:
            raise FileNotFoundError(f"train.resume: checkpoint {p} is incomplete: {reason}")
        return p
    for candidate in (p, p / "checkpoints"):
        found = latest_complete(candidate, say)
        if found:
            return found
    raise FileNotFoundError(f"train.resume: no complete checkpoint (state.pt) found at {p}")


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


@contextlib.contextmanager
def rng_preserved():
    """Whatever runs inside (a launcher's hook: Ray's report and checkpoint upload) leaves every RNG as it was: the
    training's random stream must not depend on code that a resumed run does not repeat."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _tuples(obj):
    return tuple(_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tmp(tmp: Path) -> None:
    """List every file of the checkpoint with its size in complete.json, then sync files and directories."""
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / COMPLETE).write_text(json.dumps({"files": files}, indent=1))
    for name in [*files, COMPLETE]:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    for folder in sorted({(tmp / name).parent for name in files} | {tmp}, reverse=True):
        _sync_dir(folder)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2, extra_writer=None,
                    device: Optional[torch.device] = None) -> Path:
    """Collective: every rank calls it. Rank 0 writes `state`; every rank writes its RNG; `extra_writer(tmp_dir)`
    (e.g. DeepSpeed's save_checkpoint) runs on every rank. Returns the final directory. When any rank fails to
    write, every rank raises CheckpointWriteError and the previous checkpoints stay as they were."""
    root = Path(run_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    rank = dist.get_rank()
    device = device or torch.device("cpu")

    def attempt(stage, *actions) -> None:
        """Run this rank's part of one stage; then every rank learns whether any rank failed in it."""
        error = None
        try:
            for action in actions:
                action()
        except Exception as e:  # noqa: BLE001  (no space, permissions, I/O: torch.save raises RuntimeError too;
            error = e  # every rank must reach the vote below, or the others would wait for this one forever)
        if dist.any_rank(error is not None, device):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = list_checkpoints(root)
            raise CheckpointWriteError(
                f"checkpoint {final} not written ({stage}: {error or 'failed on another rank'}); "
                f"the latest complete checkpoint is still {previous[-1] if previous else 'none'}") from error

    def make_tmp() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    attempt("creating the directory", *([make_tmp] if rank == 0 else []))
    attempt("writing", lambda: torch.save(rng_state(), tmp / f"rng_rank{rank}.pt"),
            *([lambda: extra_writer(tmp)] if extra_writer is not None else []),
            *([lambda: torch.save(state, tmp / "state.pt")] if rank == 0 else []))

    def publish() -> None:
        _finish_tmp(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _sync_dir(root)

    attempt("completing", *([publish] if rank == 0 else []))
    if rank == 0:
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
