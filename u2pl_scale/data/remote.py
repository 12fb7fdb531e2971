"""Where shards come from and how their bytes are got: shard specifications resolved to URLs (local paths,
manifests, http(s) and object-store URLs), HTTP fetching with retries, checksum verification. It holds no
streaming logic; `u2pl_scale.data.stream` splits, decodes and batches what `open_shard` opens.

Shards over http(s) are fetched whole into memory with urllib (`ReadPolicy`): a dropped connection, short body,
timeout or 5xx/408/429 answer is retried with exponential backoff, resuming with a Range request where the server
honours it; when the retries run out the error reaches the reader, which counts the shard as a "bad_shard" like
any unreadable one. Reading a shard whole before yielding keeps a shard that failed midway from contributing part
of its samples. The backoff jitter comes from a private RNG seeded by (url, retry), so retries draw from no global
RNG and a stream stays a pure function of its seeds. With `verify_checksums`, every shard is hashed before its
samples are used and a sha256 that differs from the manifest's raises `ChecksumMismatch` naming the shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Optional

import webdataset as wds

from u2pl_scale.data.shard_format import FORMAT as MANIFEST_FORMAT, MANIFEST_NAME, SPLITS_WITH_MASKS

logger = logging.getLogger(__name__)


@dataclass
class ShardSet:
    """Shard URLs of one or more sets, their total sample count (None if unknown) and the manifests read."""
    urls: list
    num_samples: Optional[int]
    manifests: list  # (manifest path/URL, manifest dict)
    checksums: dict = field(default_factory=dict)  # shard URL -> (sha256 or None, size in bytes or None)


@dataclass(frozen=True)
class ReadPolicy:
    """How shards are fetched and checked. HTTP reads are retried `retries` times, the k-th retry after
    backoff_s * 2**(k-1) seconds times a jitter in [0.5, 1) drawn from (url, k), each read with a `timeout_s`
    socket timeout. `checksums`: shard URL -> (sha256, size) from the manifests (None where unknown); the sha256
    is compared only with verify_checksums, the size completes HTTP answers that announce none."""
    retries: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 60.0
    verify_checksums: bool = False
    checksums: dict = field(default_factory=dict)


class ShardFetchError(OSError):
    """An HTTP shard or manifest that could not be read completely, after every retry."""


class ChecksumMismatch(ValueError):
    """A shard whose bytes do not match its manifest entry."""


def is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def open_stream(url: str):
    """A binary stream for a local path, pipe: command or object-store URL (http(s) goes through fetch_url)."""
    if not is_remote(url):
        return open(url, "rb")
    if url.startswith("s3://"):  # WebDataset has no s3 handler; its documented route is the aws CLI
        url = f"pipe:aws s3 cp {shlex.quote(url)} -"
    return wds.gopen(url, "rb")


# ------------------------------------------------------------------------------------------ HTTP fetching

def _retryable(error: Exception) -> bool:
    if isinstance(error, urllib.error.HTTPError):  # other 4xx answers will not change on asking again
        return error.code >= 500 or error.code in (408, 429)
    return isinstance(error, (OSError, http.client.HTTPException))


def backoff_delay(url: str, retry: int, backoff_s: float) -> float:
    """Seconds before retry number `retry` (1, 2, ...) of url. The jitter spreads workers that failed together;
    it comes from a private RNG seeded by (url, retry), so no global RNG is drawn and nothing depends on timing."""
    return backoff_s * 2 ** (retry - 1) * (0.5 + 0.5 * random.Random(f"{url}#{retry}").random())


def _fetch_into(url: str, body: bytearray, timeout_s: float, size: Optional[int]) -> None:
    """One request for the rest of url's body, appended to `body`; raises when it ends short."""
    headers = {"Range": f"bytes={len(body)}-"} if body else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
        total = response.headers.get("Content-Length")
        total = None if total is None else int(total)
        if body and response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != len(body):
                body.clear()  # not the range asked for: the next try starts over without one
                raise ShardFetchError(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
            total = None if total is None else len(body) + total
        elif body:
            body.clear()  # the server ignores Range and sends the whole body again
        while chunk := response.read(1 << 20):
            body += chunk
    # http.client reports a connection closed early as a normal end: compare with the announced size, or without
    # one (a chunked answer) with the manifest's
    expected, source = (total, "Content-Length") if total is not None else (size, "manifest size")
    if expected is not None and len(body) < expected:
        raise ShardFetchError(f"short read: {len(body)} of {expected} bytes ({source})")


def fetch_url(url: str, policy: ReadPolicy, size: Optional[int] = None) -> bytes:
    """The whole body of an http(s) URL, retried with backoff on dropped connections, short reads, timeouts and
    5xx/408/429; raises ShardFetchError (an OSError) naming the URL and the last error when every try failed."""
    body = bytearray()
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(backoff_delay(url, attempt, policy.backoff_s))
        try:
            _fetch_into(url, body, policy.timeout_s, size)
            return bytes(body)
        except (OSError, http.client.HTTPException, ValueError) as error:
            if isinstance(error, urllib.error.HTTPError):
                error.close()  # it holds the error answer's connection
                if error.code == 404:
                    raise FileNotFoundError(f"{url}: HTTP 404 not found") from None
            last = f"{type(error).__name__}: {error}"
            if not _retryable(error) or attempt == policy.retries:
                break
            logger.info("reading %s failed (%s); retry %d of %d", url, last, attempt + 1, policy.retries)
    raise ShardFetchError(f"{url}: {last} (gave up after {attempt + 1} tr{'y' if attempt == 0 else 'ies'})")


# ---------------------------------------------------------------------------------------------- manifests

def read_manifest(location: str, policy: Optional[ReadPolicy] = None) -> dict:
    """Load and check a manifest.json (local path or URL; http(s) with the policy's retries); errors name the
    location."""
    try:
        if is_http(location):
            manifest = json.loads(fetch_url(location, policy or ReadPolicy()))
        else:
            with open_stream(location) as stream:
                manifest = json.load(stream)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard manifest not found: {location}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"shard manifest {location} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"shard manifest {location}: expected format {MANIFEST_FORMAT!r}, "
                         f"got {manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r}")
    if not isinstance(manifest.get("shards"), list) or not manifest["shards"]:
        raise ValueError(f"shard manifest {location}: 'shards' must be a non-empty list")
    return manifest


def from_manifest(location: str, policy: Optional[ReadPolicy] = None) -> ShardSet:
    """The shard set a manifest lists: URLs next to it (local shards must exist), its count and checksums."""
    manifest = read_manifest(location, policy)
    if is_remote(location):
        base = location.rsplit("/", 1)[0]
        urls = [f"{base}/{entry['name']}" for entry in manifest["shards"]]
    else:
        base = os.path.dirname(os.path.abspath(location))
        urls = [os.path.join(base, entry["name"]) for entry in manifest["shards"]]
        missing = [url for url in urls if not os.path.isfile(url)]
        if missing:
            raise FileNotFoundError(f"shard {missing[0]} listed in {location} not found "
                                    f"({len(missing)} of {len(urls)} shards missing)")
    # entries of older manifests may lack size (and hand-made ones a sha256): None = unknown
    checksums = {url: (entry.get("sha256") or None, entry.get("size"))
                 for url, entry in zip(urls, manifest["shards"])}
    return ShardSet(urls, int(manifest["num_samples"]), [(location, manifest)], checksums)


# --------------------------------------------------------------------------------------------- shard sets

def _resolve_one(spec: str, policy: Optional[ReadPolicy] = None) -> ShardSet:
    if is_remote(spec):
        if spec.endswith(".json") and not spec.startswith("pipe:"):
            return from_manifest(spec, policy)
        last_part = spec.rstrip("/").rsplit("/", 1)[-1]
        if is_http(spec) and ".tar" not in last_part and "{" not in spec:  # a set's directory URL
            return from_manifest(f"{spec.rstrip('/')}/{MANIFEST_NAME}", policy)
        return ShardSet(wds.shardlists.expand_urls(spec), None, [])  # streamed as is, nothing to check
    if os.path.isdir(spec):
        manifest = os.path.join(spec, MANIFEST_NAME)
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"{manifest} not found: a shard directory needs its manifest "
                                    f"(or give a brace pattern of its shards)")
        return from_manifest(manifest)
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"shard manifest not found: {spec}")
        return from_manifest(spec)
    urls = wds.shardlists.expand_urls(spec)
    missing = [url for url in urls if not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} from {spec!r} missing)")
    return ShardSet(urls, None, [])


def resolve_set(spec: Any, policy: Optional[ReadPolicy] = None) -> ShardSet:
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ValueError("empty shard specification")
    parts = [_resolve_one(os.fspath(item), policy) for item in specs]
    counts = [part.num_samples for part in parts]
    return ShardSet([url for part in parts for url in part.urls],
                    None if None in counts else sum(counts),
                    [m for part in parts for m in part.manifests],
                    {url: entry for part in parts for url, entry in part.checksums.items()})


def resolve_shards(spec: Any) -> tuple:
    """Shard URLs and total sample count (None unless every set has a manifest) for a shard specification.

    spec: a directory holding manifest.json, a manifest path or URL, an http(s) URL of a directory holding
    manifest.json, a brace pattern of local shards, a `pipe:` command, an object-store URL (s3://, gs://,
    http(s)://.../x.tar), or a list of those. Missing local paths raise FileNotFoundError naming the path; nothing
    is listed or scanned beyond the manifest or pattern.
    """
    shard_set = resolve_set(spec)
    return shard_set.urls, shard_set.num_samples


def unlabeled_size(spec: Any) -> Optional[int]:
    """Number of samples in a shard set according to its manifest(s); None when given as a pattern or URL."""
    return resolve_set(spec).num_samples


def check_manifests(shard_set: ShardSet, split: str, num_classes: int, ignore_index: int) -> None:
    """Fail early when a manifest contradicts the split or the config."""
    for location, manifest in shard_set.manifests:
        if split in SPLITS_WITH_MASKS and not manifest.get("has_masks", False):
            raise ValueError(f"{location}: the {split} set needs masks, but its manifest says has_masks=false")
        if manifest.get("num_classes") not in (None, num_classes):
            raise ValueError(f"{location}: manifest num_classes={manifest['num_classes']} but "
                             f"data.num_classes={num_classes}")
        if manifest.get("ignore_index", ignore_index) != ignore_index:
            raise ValueError(f"{location}: manifest ignore_index={manifest['ignore_index']} but "
                             f"data.ignore_index={ignore_index}")


# ------------------------------------------------------------------------------------ opening and checking

def read_policy(data_cfg, shard_set: Optional[ShardSet] = None) -> ReadPolicy:
    """The config's read settings; given the resolved set and data.verify_checksums, its shards' checksums too."""
    policy = ReadPolicy(data_cfg.retries, data_cfg.retry_backoff_s, data_cfg.read_timeout_s)
    if shard_set is None:
        return policy
    if not data_cfg.verify_checksums:
        return dataclasses.replace(policy, checksums=dict(shard_set.checksums))
    unchecked = [url for url in shard_set.urls if shard_set.checksums.get(url, (None, None))[0] is None]
    if unchecked:
        raise ValueError(f"data.verify_checksums: shard {unchecked[0]} has no sha256 in a manifest "
                         f"({len(unchecked)} of {len(shard_set.urls)} shards); give the set as its directory "
                         f"or manifest.json (as shards/build.py writes them), not as a pattern")
    return dataclasses.replace(policy, verify_checksums=True, checksums=dict(shard_set.checksums))


def _sha256_mismatch(url: str, digest: str, expected: str) -> None:
    if digest != expected:
        raise ChecksumMismatch(f"sha256 {digest[:16]}... differs from the manifest's {expected[:16]}... "
                               f"(shard {url.rsplit('/', 1)[-1]} was modified or damaged)")


def open_shard(url: str, policy: ReadPolicy) -> BinaryIO:
    """A shard's bytes as a stream: http(s) fetched whole (with retries), others streamed; verified first when
    the policy says so."""
    expected, size = policy.checksums.get(url, (None, None))
    expected = expected if policy.verify_checksums else None
    if is_http(url):
        data = fetch_url(url, policy, size)
        if expected is not None:
            _sha256_mismatch(url, hashlib.sha256(data).hexdigest(), expected)
        return io.BytesIO(data)
    if expected is None:
        return open_stream(url)
    if not is_remote(url):  # a hashing pass first (page-cached for the read) keeps memory flat for big shards
        with open(url, "rb") as stream:
            _sha256_mismatch(url, hashlib.file_digest(stream, "sha256").hexdigest(), expected)
        return open(url, "rb")
    with open_stream(url) as stream:  # pipe: / object stores: one pass only, so hash it in memory
        data = stream.read()
    _sha256_mismatch(url, hashlib.sha256(data).hexdigest(), expected)
    return io.BytesIO(data)
