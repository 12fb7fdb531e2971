"""Typed configuration: dataclasses for every setting, YAML load, dotted CLI overrides, validation.

Every number of U2PL_SPEC.md lives here with the published default (VOC classic unless noted).
Unknown keys and bad values raise ConfigError naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


@dataclass
class DataConfig:
    # Shard sets: a manifest.json path, a directory holding manifest.json, or a WebDataset URL/brace pattern
    # (local path, pipe:..., s3://..., http(s)://...). Several sets may be joined with a list.
    labeled: Any = "shards/demo/labeled"
    unlabeled: Any = "shards/demo/unlabeled"
    val: Any = "shards/demo/val"
    num_classes: int = 21
    ignore_index: int = 255
    class_names: Optional[list] = None
    crop_size: int = 513
    scale_range: list = field(default_factory=lambda: [0.5, 2.0])
    # "published": with probability 0.5 a factor uniform in [low, 1), otherwise in [1, high] (the published
    # RandResize; ranges that do not straddle 1 fall back to uniform); "uniform": uniform in [low, high]
    scale_rule: str = "published"
    flip_prob: float = 0.5
    mean: list = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list = field(default_factory=lambda: [58.395, 57.12, 57.375])
    batch_size_labeled: int = 4  # per rank (B_l)
    batch_size_unlabeled: int = 4  # per rank (B_u)
    batch_size_val: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # Size of the unlabeled set; 0 = read from the unlabeled manifest. An epoch is one pass over it.
    unlabeled_size: int = 0
    # Steps per epoch; 0 = derived: ceil(unlabeled_size / (world_size * batch_size_unlabeled)).
    steps_per_epoch: int = 0
    # Bad samples (corrupt image, mask mismatch, out-of-range labels): "skip" (counted, reported) or "error".
    on_bad_sample: str = "skip"
    # Shards over http(s):// (a set's directory URL holding manifest.json, its manifest URL, or shard URLs): a
    # dropped connection, short read, timeout or 5xx/408/429 answer is retried `retries` times, the k-th retry after
    # retry_backoff_s * 2^(k-1) s (times a jitter in [0.5, 1)); then the shard is skipped as a bad shard.
    retries: int = 3
    retry_backoff_s: float = 0.5
    read_timeout_s: float = 60.0  # socket timeout of each HTTP read
    # Hash every shard before its samples are used and compare with its manifest's sha256; a shard that differs is
    # a bad shard, named in the log (skipped and counted, or the error with on_bad_sample=error). Needs manifests.
    verify_checksums: bool = False
    # Build the demo shards when the configured paths are missing and name the demo set.
    build_demo_if_missing: bool = True


@dataclass
class ModelConfig:
    backbone: str = "resnet101"
    pretrained: bool = True
    # Local weights file (.pth/.safetensors) for the backbone; takes precedence over the timm hub.
    pretrained_path: str = ""
    output_stride: int = 8
    aspp_dilations: list = field(default_factory=lambda: [12, 24, 36])
    head_channels: int = 256
    low_level_channels: int = 256
    rep_dim: int = 256
    dropout: float = 0.1
    aux_head: bool = False
    aux_weight: float = 0.4
    sync_bn: bool = True
    # Dilations of the last ResNet stage's 3x3 convs, block by block ([4, 8, 16]: the published ResNet-101's
    # multi-grid layer4); [] keeps timm's dilations (2, 4, 4 at output stride 8).
    multi_grid: list = field(default_factory=list)
    # Stem max-pool with ceil_mode, as published (one more row/column at stride 4 when the stem output is even).
    stem_ceil_mode: bool = False
    # pretrained_path must fill every backbone tensor and use every file tensor (an ImageNet classifier excepted);
    # true turns that error into a warning.
    allow_partial_load: bool = False
    # ViT encoders (backbone vit_* / eva*: DINOv2, DINOv3; model/vit.py, DPT-style decoder of head_channels):
    # the four blocks read ([] = 2/5/8/11 of 12, 4/11/17/23 of 24), stochastic depth, a frozen encoder,
    # activation checkpointing (large encoders), and extra timm.create_model arguments (e.g. a tiny test size:
    # {embed_dim: 48, depth: 4, num_heads: 3}).
    vit_blocks: list = field(default_factory=list)
    drop_path: float = 0.0
    freeze_backbone: bool = False
    grad_checkpointing: bool = False
    backbone_kwargs: dict = field(default_factory=dict)


@dataclass
class ContrastiveConfig:
    enabled: bool = True
    # The EFFECTIVE weight, the same at any world size (each rank's loss enters DDP's gradient average). The paper
    # says 0.1; the published code writes 1.0 but all-reduces the value without gradient and divides by the world
    # size, so its effective weight is 1/GPUs: 0.25 on VOC's 4 GPUs (this default), 0.125 on Cityscapes' 8.
    weight: float = 0.25
    low_entropy_start: float = 20.0  # alpha_0 in percent; alpha_t = alpha_0 * (1 - t)
    anchor_threshold: float = 0.3
    negative_threshold: float = 1.0
    low_rank: int = 3
    high_rank: int = 20
    num_anchors: int = 256
    num_negatives: int = 50
    temperature: float = 0.5
    queue_size: int = 30000
    # Per-class capacity overrides {class_index: capacity}; VOC uses {0: 50000}.
    queue_size_per_class: dict = field(default_factory=lambda: {0: 50000})
    queue_dtype: str = "float32"
    # the rows per class the cluster adds to the queues per step, as a fraction of each class's capacity (1.0: a
    # whole queue's worth, what the published push keeps when a step has that many negatives); below 1 the queues
    # span ~1/f steps and the all-gather moves f times the bytes (method/queues.py, benchmarks/scaling.py)
    exchange_fraction: float = 1.0


@dataclass
class OhemConfig:
    enabled: bool = False
    thresh: float = 0.7
    min_kept: int = 100000


@dataclass
class MethodConfig:
    name: str = "u2pl"  # u2pl | supervised
    sup_only_epoch: int = 1
    ema_decay: float = 0.99
    # Epochs after the supervised-only ones in which the teacher's parameters are the student's: the published code
    # re-copies them at every step of the first semi-supervised epoch. Then EMA with decay min(1 - 1/(k+1),
    # ema_decay), k counted from the first semi-supervised step as published. 0: one copy, then the EMA at once.
    teacher_follow_epochs: int = 1
    unsup_weight: float = 1.0
    drop_percent_start: float = 20.0  # percent of highest-entropy pixels dropped at t=0
    cutmix_prob: float = 0.5
    # strong colour augmentation of the student's unlabeled batch (off in the published defaults, spec §3.3):
    # a random hue rotation of up to this fraction of a full turn per image (0 = off, 0.5 = any hue)
    hue_jitter: float = 0.0
    ohem: OhemConfig = field(default_factory=OhemConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)


@dataclass
class OptimConfig:
    # "sgd" (momentum, as published) or "adamw" (for short from-scratch runs such as the demo)
    name: str = "sgd"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    head_lr_multiplier: float = 10.0
    poly_power: float = 0.9
    # LR scaling with the global labeled batch: "none" keeps lr; "linear" multiplies lr by
    # global_batch / reference_batch (reference = the published GPUs x B_l, 16 for VOC).
    lr_scaling: str = "none"
    reference_batch: int = 16
    fused: bool = True
    use_apex: bool = False
    # ViT recipes (UniMatch V2: AdamW, encoder lr 5e-6, head x40, weight decay 0.01): layer-wise LR decay of the
    # encoder blocks (1.0 = off) and no weight decay on biases, norms and position/class/register tokens.
    layer_decay: float = 1.0
    no_decay_norm_bias: bool = False


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole | sliding
    crop_size: int = 513
    stride_rate: float = 2.0 / 3.0
    interval_epochs: int = 1
    num_pictures: int = 8


@dataclass
class TrainConfig:
    epochs: int = 80
    max_steps: int = 0  # 0 = no cap
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto: bf16 where the device runs it natively, else fp32
    channels_last: bool = True
    compile: bool = False
    compile_method: bool = False  # torch.compile of the method losses (step.method_losses) as one graph
    # its torch.compile mode: reduce-overhead replays it as CUDA graphs on a GPU (one launch instead of hundreds);
    # cuda-graph: no torch.compile, the eager method captured as CUDA graphs by hand (CUDA only)
    compile_method_mode: str = "reduce-overhead"
    # auto: the method's stages as u2pl_scale/accel implements them for the device (CPU loops, Triton on CUDA);
    # reference: u2pl_scale/method's own everywhere (same results up to float rounding, slower)
    method_implementation: str = "auto"
    # torch.backends.cudnn.benchmark on a GPU: time each convolution's algorithms once per input shape and keep the
    # fastest (training crops have one shape; on by default, as in the published code)
    cudnn_benchmark: bool = True
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 20
    checkpoint_interval: int = 0  # steps; 0 = at the end of every epoch only
    keep_checkpoints: int = 2
    # a step whose loss or gradients are not finite is skipped and counted; this many in a row stop the run
    # (engine/guard.py); 0 = never stop
    max_consecutive_nonfinite: int = 20
    run_dir: str = "runs/demo"
    resume: str = ""  # path to checkpoint, "auto" = latest in run_dir, "" = fresh
    progress_bar: bool = True
    num_threads: int = 0  # torch threads per rank on CPU; 0 = this machine's cores / ranks on this machine


@dataclass
class EngineConfig:
    backend: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 0
    grad_clip: float = 0.0
    find_unused_parameters: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# torch.compile's modes, and "cuda-graph": the eager method captured by hand as CUDA graphs (engine/graphed.py)
COMPILE_METHOD_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "cuda-graph")

_CHOICES = {
    "train.compile_method_mode": COMPILE_METHOD_MODES,
    "train.method_implementation": ("auto", "reference"),
    "data.on_bad_sample": ("skip", "error"),
    "method.name": ("u2pl", "supervised"),
    "optim.lr_scaling": ("none", "linear", "sqrt"),
    "data.scale_rule": ("published", "uniform"),
    "optim.name": ("sgd", "adamw"),
    "eval.mode": ("whole", "sliding"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "engine.backend": ("ddp", "deepspeed"),
    "method.contrastive.queue_dtype": ("float32", "bfloat16", "float16"),
}


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
