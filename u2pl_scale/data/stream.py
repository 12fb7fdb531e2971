"""Shard reading: split shard sets over nodes and workers, and stream batches.

Train streams (`make_train_loader`) are endless and reshuffled every pass, so every rank yields exactly the
number of batches asked for, whatever the shard sizes (no DDP hang). The shard list is shuffled per
(seed, epoch, pass) and dealt to global workers (rank * num_workers + worker); with fewer shards than global
workers each worker reads every shard and keeps every G-th sample instead. Batches are assembled inside the
workers, and DataLoader hands them out round-robin, so the stream is a pure function of
(seed, epoch, rank, start_step); a resumed stream is the tail of the uninterrupted one.

Val streams (`make_val_loader`) read every shard once, in manifest order, and keep sample i on rank
i % world_size (then split over workers), unaugmented, batch size 1.

Bad samples and unreadable shards are skipped and counted by reason (`on_bad_sample="skip"`; counts travel in
each batch's "bad" dict and add up in the stream's `bad_counts`) or raise `BadSample` naming shard and key.

Shards are opened by `u2pl_scale.data.remote` (http(s) fetched whole with retries, checksums verified per
`ReadPolicy`); a shard it cannot fetch or verify is a "bad_shard" like any unreadable one, named in the log (or the
error). Skipped shards never shorten a train stream: it is endless and cut at the asked number of batches.
"""
from __future__ import annotations

import collections
import itertools
import logging
import tarfile
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from u2pl_scale.data.decode import BAD_REASONS, BadSample, decode_sample
# resolve_shards, unlabeled_size and read_manifest are re-exported: callers import them from here
from u2pl_scale.data.remote import (ReadPolicy, check_manifests, open_shard, read_manifest,  # noqa: F401
                                    read_policy, resolve_set, resolve_shards, unlabeled_size)
from u2pl_scale.data.shard_format import MEMBER_NAME as _MEMBER_NAME  # key up to the first dot
from u2pl_scale.data.transforms import weak_augment

logger = logging.getLogger(__name__)

_SHUFFLE_STREAM = 1  # distinguishes the shuffle-buffer RNG from the per-sample augmentation RNGs


# --------------------------------------------------------------------------------------- reading shards

def _skip_or_raise(error: BadSample, on_bad_sample: str, counts: collections.Counter) -> None:
    if on_bad_sample == "error":
        raise error
    counts[error.reason] += 1
    logger.warning("skipping %s", error)


def iter_shard(url: str, on_bad_sample: str, counts: collections.Counter,
               policy: Optional[ReadPolicy] = None) -> Iterator[tuple]:
    """Raw samples (key, {extension: bytes}) of one tar shard, in tar order; nothing is decoded here.

    A shard that cannot be opened, fetched (after the policy's retries), verified or read as a tar is counted as
    "bad_shard" (or raises in "error" mode); members without an extension are counted as unexpected members.
    """
    try:
        with open_shard(url, policy or ReadPolicy()) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                match = _MEMBER_NAME.match(info.name)
                if match is None:
                    counts["unexpected_member"] += 1
                    continue
                member_key, extension = match.group(1), match.group(2).lower()
                data = tar.extractfile(info).read()
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                if extension in members:  # a repeated member: keep the first
                    counts["unexpected_member"] += 1
                    continue
                members[extension] = data
            if key is not None:
                yield key, members
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        _skip_or_raise(BadSample("bad_shard", url, detail=f"{type(exc).__name__}: {exc}"), on_bad_sample, counts)


class WorkerShare(NamedTuple):
    """What one global worker reads in one pass: these shards, keeping samples whose running index i over
    them satisfies i % sample_stride == sample_offset (stride 1 = whole shards)."""
    urls: list
    sample_stride: int
    sample_offset: int


def worker_share(urls: Sequence[str], seed: int, epoch: int, cycle: int, global_worker: int,
                 global_workers: int) -> WorkerShare:
    """Deal the (seed, epoch, cycle)-shuffled shard list to global workers; sample-level split when there are
    fewer shards than workers. Over all global workers one pass covers every sample exactly once."""
    order = _rng(seed, epoch, cycle).permutation(len(urls))
    shuffled = [urls[i] for i in order]
    if len(shuffled) >= global_workers:
        return WorkerShare(shuffled[global_worker::global_workers], 1, 0)
    # Rotating the offset per pass lets every worker reach real samples even when samples < workers.
    return WorkerShare(shuffled, global_workers, (global_worker + cycle) % global_workers)


def iter_share(share: WorkerShare, on_bad_sample: str, counts: collections.Counter,
               policy: Optional[ReadPolicy] = None) -> Iterator[tuple]:
    """One non-repeating pass over a worker's share: (shard url, key, members) of the samples it owns."""
    index = 0
    for position, url in enumerate(share.urls):
        # With a sample-level split every worker reads every shard; one of them reports a broken shard.
        reports_shard = position % share.sample_stride == share.sample_offset
        shard_counts = counts if reports_shard else collections.Counter()
        for key, members in iter_shard(url, on_bad_sample, shard_counts, policy):
            if index % share.sample_stride == share.sample_offset:
                yield url, key, members
            index += 1


def _rng(*ints: int) -> np.random.Generator:
    return np.random.default_rng([value % 2**63 for value in ints])


def shuffle_buffer(items: Iterable, capacity: int, rng: np.random.Generator) -> Iterator:
    """Reservoir shuffle: hold `capacity` items, emit a random one for each new one (then drain, if finite)."""
    if capacity <= 1:  # shuffle_buffer 0 or 1: the stream order as read (shards are still shuffled per pass)
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < capacity:
            buffer.append(item)
            continue
        index = int(rng.integers(capacity))
        yield buffer[index]
        buffer[index] = item
    for index in rng.permutation(len(buffer)):
        yield buffer[index]


def _bad_dict(counts: collections.Counter) -> dict:
    return {reason: int(counts.get(reason, 0)) for reason in BAD_REASONS}


# ------------------------------------------------------------------------------------------ train stream

class _TrainBatches(IterableDataset):
    """Endless stream of augmented batches for one rank; each DataLoader worker builds whole batches."""

    def __init__(self, urls: list, with_label: bool, data_cfg, batch_size: int, rank: int, world_size: int,
                 seed: int, epoch: int, start_step: int, policy: Optional[ReadPolicy] = None):
        self.urls, self.with_label, self.batch_size = urls, with_label, batch_size
        self.policy = policy or ReadPolicy()
        self.rank, self.world_size, self.seed, self.epoch, self.start_step = rank, world_size, seed, epoch, start_step
        self.num_workers = max(1, data_cfg.num_workers)
        self.num_classes, self.ignore_index = data_cfg.num_classes, data_cfg.ignore_index
        self.crop_size, self.scale_range, self.flip_prob = data_cfg.crop_size, data_cfg.scale_range, data_cfg.flip_prob
        self.mean, self.shuffle_capacity = data_cfg.mean, data_cfg.shuffle_buffer
        self.scale_rule = data_cfg.scale_rule
        self.on_bad_sample = data_cfg.on_bad_sample

    def _owned_samples(self, global_worker: int, global_workers: int, counts: collections.Counter) -> Iterator:
        """(pass, url, key, members) of this worker, pass after pass, each pass reshuffled."""
        empty_passes = 0
        for cycle in itertools.count():
            share = worker_share(self.urls, self.seed, self.epoch, cycle, global_worker, global_workers)
            owned = 0
            for url, key, members in iter_share(share, self.on_bad_sample, counts, self.policy):
                owned += 1
                yield cycle, url, key, members
            empty_passes = 0 if owned else empty_passes + 1
            if empty_passes > global_workers:  # the rotating offset reaches a non-empty share within G passes
                raise RuntimeError(f"worker {global_worker} of {global_workers} found no samples in "
                                   f"{empty_passes} passes over {len(self.urls)} shards ({self.urls[0]}, ...); "
                                   f"skipped so far: {dict(counts)}")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        # DataLoader always starts at worker 0; shifting roles by start_step makes batch start_step come first.
        role = (worker_id + self.start_step) % self.num_workers
        global_worker, global_workers = self.rank * self.num_workers + role, self.world_size * self.num_workers
        batches_to_skip = max(0, -(-(self.start_step - role) // self.num_workers))  # this role's batches < start_step
        counts = collections.Counter()
        samples = shuffle_buffer(self._owned_samples(global_worker, global_workers, counts), self.shuffle_capacity,
                                 _rng(self.seed, self.epoch, self.rank, role, _SHUFFLE_STREAM))
        pending, skipped_good = [], 0
        bad_run, bad_run_start_pass, newest_pass = 0, 0, 0
        for position, (cycle, url, key, members) in enumerate(samples):
            newest_pass = max(newest_pass, cycle)
            try:
                decoded = decode_sample(members, url, key, self.with_label, self.num_classes, self.ignore_index)
            except BadSample as error:
                _skip_or_raise(error, self.on_bad_sample, counts)
                bad_run_start_pass = newest_pass if bad_run == 0 else bad_run_start_pass
                bad_run += 1
                # A whole buffer and G + 2 passes of input without one good sample: all is bad, do not spin.
                if bad_run > self.shuffle_capacity and newest_pass - bad_run_start_pass > global_workers + 1:
                    raise RuntimeError(f"no usable sample in the last {bad_run} read from {len(self.urls)} shards "
                                       f"({self.urls[0]}, ...); skipped: {dict(counts)}")
                continue
            bad_run = 0
            counts["unexpected_member"] += decoded.unexpected_members
            if batches_to_skip:  # resume: the skipped batches' samples are decoded (to know they are good) only
                skipped_good += 1
                if skipped_good == self.batch_size:
                    skipped_good, batches_to_skip = 0, batches_to_skip - 1
                    if not batches_to_skip:
                        counts.clear()  # those were reported before the resume
                continue
            rng = _rng(self.seed, self.epoch, self.rank, role, position)  # per sample, so skipping needs no draws
            augmented = weak_augment(decoded.image, decoded.mask, rng, self.crop_size, self.scale_range,
                                     self.flip_prob, self.mean, self.ignore_index, self.scale_rule)
            pending.append((key, augmented))
            if len(pending) == self.batch_size:
                yield self._collate(pending, counts)
                pending = []
                counts.clear()

    def _collate(self, samples: list, counts: collections.Counter) -> dict:
        # HWC stacked as is and viewed as NCHW: a channels-last tensor without a transposing copy.
        batch = {"image": torch.from_numpy(np.stack([a.image for _, a in samples])).permute(0, 3, 1, 2),
                 "valid": torch.from_numpy(np.stack([a.valid for _, a in samples])),
                 "key": [key for key, _ in samples], "bad": _bad_dict(counts)}
        if self.with_label:
            batch["label"] = torch.from_numpy(np.stack([a.mask for _, a in samples]))  # uint8: 1/8 of long's IPC
        return batch


# -------------------------------------------------------------------------------------------- val stream

class _ValSamples(IterableDataset):
    """Every val sample once over all ranks and workers: sample i goes to rank i % world_size."""

    def __init__(self, urls: list, data_cfg, rank: int, world_size: int, policy: Optional[ReadPolicy] = None):
        self.urls, self.rank, self.world_size = urls, rank, world_size
        self.policy = policy or ReadPolicy()
        self.num_workers = max(1, data_cfg.num_workers)
        self.num_classes, self.ignore_index = data_cfg.num_classes, data_cfg.ignore_index
        self.on_bad_sample = data_cfg.on_bad_sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        # Offset worker * world_size + rank with stride world_size * workers: i % world_size == rank, then by worker.
        share = WorkerShare(self.urls, self.world_size * self.num_workers, worker_id * self.world_size + self.rank)
        counts = collections.Counter()
        for url, key, members in iter_share(share, self.on_bad_sample, counts, self.policy):
            try:
                decoded = decode_sample(members, url, key, True, self.num_classes, self.ignore_index)
            except BadSample as error:
                _skip_or_raise(error, self.on_bad_sample, counts)
                continue
            counts["unexpected_member"] += decoded.unexpected_members
            # Copies because PIL hands out read-only arrays; the image is a channels-last view like train batches.
            yield {"image": torch.from_numpy(decoded.image.copy()).permute(2, 0, 1)[None],
                   "label": torch.from_numpy(decoded.mask.copy())[None],
                   "key": [key], "bad": _bad_dict(counts)}
            counts.clear()
        if counts:  # counts after the last good sample still reach the main process
            yield {"bad": _bad_dict(counts)}


# ----------------------------------------------------------------------------------------- loader objects

class _BatchStream:
    """Runs a DataLoader over a batch-building dataset; sums the per-batch "bad" counts into `bad_counts`."""

    def __init__(self, dataset: IterableDataset, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self.bad_counts = collections.Counter()

    def _records(self) -> Iterator[dict]:
        self.bad_counts = collections.Counter()
        # the workers' randomness comes from (seed, epoch, rank, position); a private generator keeps the DataLoader
        # from drawing its base seed from the global RNG, which a mid-epoch resume restores after that draw
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
        for record in loader:
            self.bad_counts.update({reason: n for reason, n in record["bad"].items() if n})
            if "image" in record:  # a counts-only record carries no batch
                yield record


class TrainStream(_BatchStream):
    """Exactly `len(self)` batches of one rank's train stream; iterating again replays the same batches."""

    def __init__(self, dataset: IterableDataset, num_workers: int, num_batches: int):
        super().__init__(dataset, num_workers)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self.num_batches <= 0:
            return
        records = self._records()
        try:
            yield from itertools.islice(records, self.num_batches)
        finally:
            records.close()  # the workers' streams are endless: stop them now, not at garbage collection


class ValStream(_BatchStream):
    """This rank's val samples, one per batch, in a fixed order."""

    def __iter__(self) -> Iterator[dict]:
        yield from self._records()


def make_train_loader(data_cfg, split: str, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                      steps: int, start_step: int = 0) -> TrainStream:
    """Weakly augmented train batches of one rank for one epoch: exactly `steps - start_step` of them.

    Each batch: "image" uint8 [B, 3, crop, crop] (channels-last memory); "label" uint8 [B, crop, crop] (labeled
    only; ignore_index in padding; .long() it on the device); "valid" bool [B, crop, crop] (False in padding);
    "key" list of B str; "bad" {reason: count for every reason in BAD_REASONS} of what the worker skipped since
    its previous batch.
    """
    if split not in ("labeled", "unlabeled"):
        raise ValueError(f"split must be 'labeled' or 'unlabeled', got {split!r}")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, steps={steps}], got {start_step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    shard_set = resolve_set(getattr(data_cfg, split), read_policy(data_cfg))
    check_manifests(shard_set, split, data_cfg.num_classes, data_cfg.ignore_index)
    dataset = _TrainBatches(shard_set.urls, split == "labeled", data_cfg, batch_size, rank, world_size, seed, epoch,
                            start_step, read_policy(data_cfg, shard_set))
    return TrainStream(dataset, data_cfg.num_workers, steps - start_step)


def make_val_loader(data_cfg, rank: int, world_size: int) -> ValStream:
    """Full-size val samples of one rank, unaugmented: "image" uint8 [1, 3, H, W] (channels-last memory),
    "label" uint8 [1, H, W], "key" [str], "bad" {reason: count}. Over all ranks every sample is seen exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    shard_set = resolve_set(data_cfg.val, read_policy(data_cfg))
    check_manifests(shard_set, "val", data_cfg.num_classes, data_cfg.ignore_index)
    return ValStream(_ValSamples(shard_set.urls, data_cfg, rank, world_size, read_policy(data_cfg, shard_set)),
                     data_cfg.num_workers)
