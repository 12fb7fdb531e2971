"""The configuration's schema: one dataclass per section with every setting and its published default (VOC classic
unless noted; U2PL_SPEC.md), and the settings that take one of a few values. Loading, overrides, validation and
derived values: config.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


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
    compile: bool = False  # torch.compile of the student's and the teacher's forward
    # its mode: reduce-overhead / max-autotune also replay the compiled model as CUDA graphs on a GPU (launch-bound
    # steps; evaluation then runs the model eager, as its whole images change shape)
    compile_mode: str = "default"
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


# torch.compile's modes (the model's); the method's also "cuda-graph": the eager method captured by hand as CUDA
# graphs (engine/graphed.py)
MODEL_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_METHOD_MODES = (*MODEL_COMPILE_MODES, "cuda-graph")

_CHOICES = {
    "train.compile_mode": MODEL_COMPILE_MODES,
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
