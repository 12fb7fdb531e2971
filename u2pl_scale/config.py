"""Typed configuration: YAML load, dotted CLI overrides, validation and derived values, over the dataclasses of
config_schema.py (every setting, with the published default of U2PL_SPEC.md).
Unknown keys and bad values raise ConfigError naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml


from .config_schema import (  # noqa: F401  (the schema is part of this module's interface)
    _CHOICES,
    COMPILE_METHOD_MODES,
    MODEL_COMPILE_MODES,
    Config,
    ConfigError,
    ContrastiveConfig,
    DataConfig,
    EngineConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OhemConfig,
    OptimConfig,
    TrainConfig,
)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        return _coerce_number(value, tp, key)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _coerce_number(value: Any, tp: type, key: str):
    """int or float from a number or numeric string; bools and fractional values for ints are refused."""
    if not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}"
            + (f" (valid keys under {prefix.rstrip('.') or 'top level'}: {', '.join(sorted(names))})")
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if _is_dataclass_type(tp):
            kwargs[name] = _from_dict(tp, value if value is not None else {}, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _parse_cli_value(text: str) -> Any:
    """Parse a CLI override value with YAML rules (3 -> int, 0.2 -> float, [1,2] -> list, true -> bool)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted `a.b.c=value` overrides to a nested dict (validated later against the dataclasses)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        cls = Config
        for depth, part in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
            if cls is not None and part not in names:
                raise ConfigError(f"unknown config key {'.'.join(parts[:depth + 1])} in override {item!r}")
            tp = typing.get_type_hints(cls)[part] if cls is not None else None
            if depth == len(parts) - 1:
                node[part] = _parse_cli_value(text)
            else:
                if not _is_dataclass_type(tp):
                    # e.g. method.contrastive.queue_size_per_class.0=50000 -> dict entry
                    sub = node.setdefault(part, {})
                    rest = parts[depth + 1:]
                    for p in rest[:-1]:
                        sub = sub.setdefault(p, {})
                    last = rest[-1]
                    sub[int(last) if last.isdigit() else last] = _parse_cli_value(text)
                    break
                if not isinstance(node.get(part), dict):  # absent or empty (None) section in the YAML
                    node[part] = {}
                node = node[part]
                cls = tp
    return raw


def validate(cfg: Config) -> Config:
    """Check value ranges and choices; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    d = cfg.data
    if d.num_classes < 2:
        raise ConfigError(f"data.num_classes: need at least 2 classes, got {d.num_classes}")
    if not (0 <= d.ignore_index <= 255) or d.ignore_index < d.num_classes:
        raise ConfigError(f"data.ignore_index: {d.ignore_index} must be in [num_classes, 255]")
    if d.num_classes > 255:
        raise ConfigError(f"data.num_classes: at most 255 classes fit 8-bit masks, got {d.num_classes}")
    if d.crop_size < 16:
        raise ConfigError(f"data.crop_size: must be >= 16, got {d.crop_size}")
    if len(d.scale_range) != 2 or not (0 < d.scale_range[0] <= d.scale_range[1]):
        raise ConfigError(f"data.scale_range: expected [low, high] with 0 < low <= high, got {d.scale_range}")
    if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
        raise ConfigError("data.mean/data.std: expected three values each, std > 0")
    for name in ("batch_size_labeled", "batch_size_unlabeled", "batch_size_val"):
        if getattr(d, name) < 1:
            raise ConfigError(f"data.{name}: must be >= 1, got {getattr(d, name)}")
    if d.num_workers < 0 or d.steps_per_epoch < 0 or d.unlabeled_size < 0:
        raise ConfigError("data.num_workers/steps_per_epoch/unlabeled_size: must be >= 0")
    if d.retries < 0:
        raise ConfigError(f"data.retries: must be >= 0, got {d.retries}")
    if d.retry_backoff_s < 0:
        raise ConfigError(f"data.retry_backoff_s: must be >= 0, got {d.retry_backoff_s}")
    if d.read_timeout_s <= 0:
        raise ConfigError(f"data.read_timeout_s: must be > 0, got {d.read_timeout_s}")
    if cfg.model.output_stride not in (8, 16, 32):
        raise ConfigError(f"model.output_stride: must be 8, 16 or 32, got {cfg.model.output_stride}")
    if len(cfg.model.aspp_dilations) != 3:
        raise ConfigError(f"model.aspp_dilations: expected three dilations, got {cfg.model.aspp_dilations}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in cfg.model.multi_grid):
        raise ConfigError(f"model.multi_grid: expected positive integer dilations (one per block of the last "
                          f"stage) or [], got {cfg.model.multi_grid}")
    c = cfg.method.contrastive
    if not (0 <= c.low_rank < c.high_rank):
        raise ConfigError(f"method.contrastive.low_rank/high_rank: need 0 <= low_rank < high_rank, got "
                          f"{c.low_rank}/{c.high_rank}")
    if c.temperature <= 0:
        raise ConfigError(f"method.contrastive.temperature: must be > 0, got {c.temperature}")
    if not 0.0 < c.exchange_fraction <= 1.0:
        raise ConfigError(f"method.contrastive.exchange_fraction: must be in (0, 1], got {c.exchange_fraction}")
    for k, v in c.queue_size_per_class.items():
        if not isinstance(k, int) or not (0 <= k < d.num_classes) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"method.contrastive.queue_size_per_class: bad entry {k!r}: {v!r} "
                              f"(class index in [0, {d.num_classes}) -> capacity >= 1)")
    if c.queue_size < 1 or c.num_anchors < 1 or c.num_negatives < 1:
        raise ConfigError("method.contrastive.queue_size/num_anchors/num_negatives: must be >= 1")
    if not (0 <= cfg.method.ema_decay < 1):
        raise ConfigError(f"method.ema_decay: must be in [0, 1), got {cfg.method.ema_decay}")
    if not (0 <= cfg.method.cutmix_prob <= 1):
        raise ConfigError(f"method.cutmix_prob: must be in [0, 1], got {cfg.method.cutmix_prob}")
    if not (0 <= cfg.method.hue_jitter <= 0.5):
        raise ConfigError(f"method.hue_jitter: must be in [0, 0.5] (a fraction of a full hue turn), "
                          f"got {cfg.method.hue_jitter}")
    if not (0 <= cfg.method.drop_percent_start < 100):
        raise ConfigError(f"method.drop_percent_start: must be in [0, 100), got {cfg.method.drop_percent_start}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if not 0 < cfg.optim.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay: must be in (0, 1], got {cfg.optim.layer_decay}")
    if not 0 <= cfg.model.drop_path < 1:
        raise ConfigError(f"model.drop_path: must be in [0, 1), got {cfg.model.drop_path}")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {cfg.train.epochs}")
    if cfg.train.max_steps < 0:
        raise ConfigError(f"train.max_steps: must be >= 0, got {cfg.train.max_steps}")
    if cfg.train.max_consecutive_nonfinite < 0:
        raise ConfigError(f"train.max_consecutive_nonfinite: must be >= 0 (0 = never stop), got "
                          f"{cfg.train.max_consecutive_nonfinite}")
    if cfg.method.sup_only_epoch < 0:
        raise ConfigError("method.sup_only_epoch: must be >= 0")
    if cfg.method.teacher_follow_epochs < 0:
        raise ConfigError("method.teacher_follow_epochs: must be >= 0")
    if cfg.method.contrastive.weight < 0:
        raise ConfigError(f"method.contrastive.weight: must be >= 0, got {cfg.method.contrastive.weight}")
    if cfg.engine.zero_stage not in (0, 1, 2):
        raise ConfigError(f"engine.zero_stage: 0, 1 or 2 are supported, got {cfg.engine.zero_stage}")
    if cfg.eval.crop_size < 16 or not (0 < cfg.eval.stride_rate <= 1):
        raise ConfigError("eval.crop_size must be >= 16 and eval.stride_rate in (0, 1]")
    if cfg.train.log_interval < 1:
        raise ConfigError("train.log_interval: must be >= 1")
    return cfg


def get_key(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def config_from_dict(raw: dict) -> Config:
    return validate(_from_dict(Config, raw or {}))


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply dotted overrides."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        with open(p) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
    raw = apply_overrides(raw, list(overrides or []))
    return config_from_dict(raw)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def queue_capacities(cfg: Config) -> list[int]:
    c = cfg.method.contrastive
    return [int(c.queue_size_per_class.get(i, c.queue_size)) for i in range(cfg.data.num_classes)]


@dataclass
class Derived:
    """Values the run derives from the config and the world; printed at start."""
    world_size: int
    global_batch_labeled: int
    global_batch_unlabeled: int
    unlabeled_size: int
    steps_per_epoch: int
    total_steps: int
    sup_only_steps: int
    lr: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def derive(cfg: Config, world_size: int, unlabeled_size: int) -> Derived:
    """Scaling maths (README "Scaling"): steps per epoch from the unlabeled set size and the global batch, as the
    published DistributedSampler + drop_last loader counts them (each rank gets ceil(N / W) samples, full batches
    only); LR scaled by the global labeled batch relative to the published reference batch."""
    gl = cfg.data.batch_size_labeled * world_size
    gu = cfg.data.batch_size_unlabeled * world_size
    if cfg.data.steps_per_epoch > 0:
        spe = cfg.data.steps_per_epoch
    else:
        if unlabeled_size <= 0:
            raise ConfigError("data.steps_per_epoch: cannot derive it, the unlabeled set size is unknown "
                              "(set data.unlabeled_size or data.steps_per_epoch, or use a manifest)")
        spe = max(1, math.ceil(unlabeled_size / world_size) // cfg.data.batch_size_unlabeled)
    total = spe * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    ratio = gl / cfg.optim.reference_batch
    lr = cfg.optim.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.optim.lr_scaling]
    sup_only = 0 if cfg.method.name == "supervised" else cfg.method.sup_only_epoch * spe
    return Derived(world_size, gl, gu, unlabeled_size, spe, total, sup_only, lr)


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
