"""Load a self-describing checkpoint: best.pt or a checkpoint's state.pt written with a "meta" record
(u2pl_scale/engine/checkpoint.py checkpoint_meta), read with torch.load(weights_only=True) (no pickles)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..engine.checkpoint import META_FORMAT, list_checkpoints

_META_KEYS = ("model", "num_classes", "ignore_index", "mean", "std", "evaluated_model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what is missing."""


@dataclass
class LoadedCheckpoint:
    path: Path
    model: torch.nn.Module  # eval mode, on the CPU, fp32
    meta: dict

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("class_names")
        if names and len(names) == self.num_classes:
            return [str(n) for n in names]
        return [f"class_{i}" for i in range(self.num_classes)]

    @property
    def config(self) -> dict:
        """The training config (a dict parsed from the recorded YAML; {} when absent)."""
        text = self.meta.get("config")
        return (yaml.safe_load(text) or {}) if text else {}


def resolve_checkpoint(path: str | Path) -> Path:
    """A file as is; a run directory -> its best.pt; a checkpoint step directory -> its state.pt; a run's
    checkpoints/ directory -> the latest step's state.pt."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if (p / "best.pt").is_file():
        return p / "best.pt"
    if (p / "state.pt").is_file():
        return p / "state.pt"
    for candidate in (p / "checkpoints", p):
        found = list_checkpoints(candidate)
        if found:
            return found[-1] / "state.pt"
    raise CheckpointError(f"{p}: a directory without best.pt, state.pt or checkpoints/step_*/state.pt "
                          "(expected a run directory, e.g. runs/demo, or a checkpoint file)")


def read_checkpoint(path: str | Path) -> tuple[Path, dict, dict]:
    """(file, meta, state_dict of the evaluated network) without building the model."""
    file = resolve_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (not a torch file, a pickle with foreign classes, truncated, ...)
        raise CheckpointError(f"{file}: not a u2pl-scale checkpoint (torch.load(weights_only=True) failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a u2pl-scale checkpoint (holds a {type(state).__name__}, "
                              "expected a dict with 'model' and 'meta')")
    meta = state.get("meta")
    if meta is None:
        if "model" in state:
            raise CheckpointError(f"{file}: no 'meta' record (written before checkpoints described themselves, "
                                  f"format {META_FORMAT}): the model config, classes and normalisation are "
                                  "missing; retrain, or resume the run for one more evaluation to rewrite it")
        raise CheckpointError(f"{file}: not a u2pl-scale checkpoint (no 'meta' and no 'model'; keys: "
                              f"{sorted(map(str, state))[:8]})")
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{file}: meta format {found!r}, expected {META_FORMAT!r}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{file}: meta lacks {', '.join(missing)}")
    # best.pt holds the evaluated network as "model"; a checkpoint's state.pt holds student ("model") and teacher
    key = "model"
    if "teacher" in state and meta["evaluated_model"] == "teacher":
        key = "teacher"
    weights = state.get(key)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{file}: no '{key}' weights")
    return file, meta, weights


def build_from_meta(meta: dict) -> torch.nn.Module:
    from ..config import ModelConfig
    from ..model import build_model

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    model_cfg.pretrained = False  # the checkpoint holds every weight
    model_cfg.pretrained_path = ""
    return build_model(model_cfg, int(meta["num_classes"]))


def load_checkpoint(path: str | Path, map_location: Optional[str | torch.device] = None) -> LoadedCheckpoint:
    file, meta, weights = read_checkpoint(path)
    model = build_from_meta(meta)
    weights = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in weights.items()}
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{file}: weights do not fit the recorded model config: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    if map_location is not None:
        model = model.to(map_location)
    return LoadedCheckpoint(file, model, meta)
