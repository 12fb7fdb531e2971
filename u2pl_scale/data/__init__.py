"""Data: reading WebDataset shard sets into train/val batches, safe decoding, weak augmentation.

Shard writing lives in `u2pl_scale.data.writer` (imported on its own, not from here).
"""
from u2pl_scale.data.decode import BAD_REASONS, BadSample, decode_sample
from u2pl_scale.data.stream import (
    TrainStream,
    ValStream,
    make_train_loader,
    make_val_loader,
    read_manifest,
    resolve_shards,
    unlabeled_size,
)
from u2pl_scale.data.transforms import normalize, weak_augment

__all__ = [
    "BAD_REASONS",
    "BadSample",
    "TrainStream",
    "ValStream",
    "decode_sample",
    "make_train_loader",
    "make_val_loader",
    "normalize",
    "read_manifest",
    "resolve_shards",
    "unlabeled_size",
    "weak_augment",
]
