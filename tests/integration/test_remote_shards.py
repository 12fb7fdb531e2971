"""Shards over HTTP from a real local server that cuts answers midway or answers 503: retried with backoff (and
resumed where the server honours Range), or skipped and counted as bad shards; a training run keeps its step
count with a dead shard; data.verify_checksums names a modified shard, read locally or over HTTP."""
from __future__ import annotations

import http.server
import json
import logging
import math
import re
import tarfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from u2pl_scale.config import ConfigError, DataConfig, load_config
from u2pl_scale.data.decode import BadSample
from u2pl_scale.data.stream import make_train_loader, make_val_loader, resolve_shards
from u2pl_scale.data.writer import ShardSetWriter, encode_sample
from u2pl_scale.entry import run_training

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 6  # configs/demo.yaml's
SIZE = 48
BACKOFF = 0.05
STALL_S = 1.0  # a stalled answer waits this long, beyond the tests' read timeout


# ------------------------------------------------------------------------------------------------ shards

def write_set(root: Path, split: str, num_shards: int, per_shard: int, seed: int) -> Path:
    """A set written by the project's writer: random images (and masks unless unlabeled), per_shard per shard."""
    rng = np.random.default_rng(seed)
    labeled = split != "unlabeled"
    with ShardSetWriter(root / split, split, "remote-test", num_classes=NUM_CLASSES if labeled else None,
                        max_count=per_shard) as writer:
        for index in range(num_shards * per_shard):
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            mask = rng.integers(0, NUM_CLASSES, (SIZE, SIZE)) if labeled else None
            writer.write(encode_sample(f"{split}{index:03d}", image, mask, num_classes=NUM_CLASSES))
    return root / split


def shard_keys(shard: Path) -> list:
    """Sample keys of one tar in tar order, read with tarfile only."""
    with tarfile.open(shard) as tar:
        return list(dict.fromkeys(member.name.split(".", 1)[0] for member in tar.getmembers()))


def set_keys(set_dir: Path, skip: tuple = ()) -> list:
    return [key for shard in sorted(set_dir.glob("*.tar")) if shard.name not in skip for key in shard_keys(shard)]


def modify_padding(shard: Path) -> None:
    """Change one byte of a member's zero padding: every sample still reads the same, only the checksum differs."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.size % tarfile.BLOCKSIZE)
    data = bytearray(shard.read_bytes())
    assert data[member.offset_data + member.size] == 0
    data[member.offset_data + member.size] = 0xFF
    shard.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ server

class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves files under server.root; per path it can cut the next N answers after half the body, answer 503 or
    stall before answering, and it honours `Range: bytes=N-` when server.honour_range. Every request is logged with
    its arrival time."""

    def do_GET(self):
        server = self.server
        path = urllib.parse.urlsplit(self.path).path.lstrip("/")
        with server.lock:
            server.requests.append((path, time.monotonic(), self.headers.get("Range")))
            answer_503, cut, stall = server.fail_503.get(path, 0) > 0, False, server.stall.get(path, 0) > 0
            server.stall[path] = server.stall.get(path, 0) - stall
            if answer_503:
                server.fail_503[path] -= 1
            else:
                cut = server.cut.get(path, 0) > 0
                server.cut[path] = server.cut.get(path, 0) - cut
        file = (server.root / path).resolve()
        if stall:
            time.sleep(STALL_S)
        if answer_503:
            return self.send_error(503)
        if not file.is_relative_to(server.root) or not file.is_file():
            return self.send_error(404)
        data = file.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and server.honour_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)
        self.close_connection = True  # the client sees a cut answer end at once

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    httpd.root, httpd.lock, httpd.requests = root.resolve(), threading.Lock(), []
    httpd.cut, httpd.fail_503, httpd.stall, httpd.honour_range = {}, {}, {}, False
    httpd.handle_error = lambda request, address: None  # a stalled answer meets a socket the client closed
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def gets(server, path: str) -> list:
    return [(when, byte_range) for seen, when, byte_range in server.requests if seen == path]


def read_val(val, **settings) -> tuple:
    """(keys in stream order, images, bad counts) of a val stream over `val` with num_workers=0."""
    cfg = DataConfig(val=str(val), num_classes=NUM_CLASSES, num_workers=0, retry_backoff_s=BACKOFF, **settings)
    loader = make_val_loader(cfg, 0, 1)
    records = list(loader)
    return [r["key"][0] for r in records], [r["image"] for r in records], dict(loader.bad_counts)


# ------------------------------------------------------------------------------------------------- tests

def test_http_set_reads_like_the_local_one(server):
    val = write_set(server.root, "val", num_shards=3, per_shard=3, seed=0)
    manifest = json.loads((val / "manifest.json").read_text())
    for entry in manifest["shards"]:
        assert entry["size"] == (val / entry["name"]).stat().st_size  # the writer's manifest records sizes
    names = [entry["name"] for entry in manifest["shards"]]
    assert resolve_shards(f"{server.url}/val") == ([f"{server.url}/val/{name}" for name in names], 9)
    assert resolve_shards(f"{server.url}/val/manifest.json") == resolve_shards(f"{server.url}/val/")
    assert resolve_shards(f"{server.url}/val/val-{{000000..000001}}.tar") == ([f"{server.url}/val/{n}" for n in
                                                                                names[:2]], None)
    server.requests.clear()
    keys, images, bad = read_val(f"{server.url}/val", verify_checksums=True)
    local_keys, local_images, _ = read_val(val)
    assert keys == set_keys(val) == local_keys and bad == {}
    assert all((a == b).all() for a, b in zip(images, local_images))
    # a healthy server is asked once per file: no retry without a failure
    assert sorted(path for path, _, _ in server.requests) == ["val/manifest.json"] + [f"val/{n}" for n in names]


@pytest.mark.parametrize("honour_range", [False, True])
def test_cut_and_503_answers_are_retried_with_backoff(server, honour_range):
    val = write_set(server.root, "val", num_shards=3, per_shard=3, seed=1)
    server.honour_range = honour_range
    server.cut["val/val-000001.tar"] = 2
    server.fail_503["val/val-000002.tar"] = 1
    server.fail_503["val/manifest.json"] = 1
    server.stall["val/val-000000.tar"] = 1
    keys, _, bad = read_val(f"{server.url}/val", retries=3, read_timeout_s=0.25)
    assert keys == set_keys(val) and bad == {}  # read fully in the end, nothing counted
    for path in ("val/manifest.json", "val/val-000000.tar", "val/val-000002.tar"):
        assert len(gets(server, path)) == 2, path
    tries = gets(server, "val/val-000001.tar")
    assert len(tries) == 3
    for retry in (1, 2):  # the k-th retry waits at least half of BACKOFF * 2^(k-1) (jitter in [0.5, 1))
        assert tries[retry][0] - tries[retry - 1][0] >= 0.5 * BACKOFF * 2 ** (retry - 1)
    size = (val / "val-000001.tar").stat().st_size
    first_cut = size // 2  # each cut answer carries half of what it was asked for
    # resumed from the bytes held when the server honours Range; otherwise its whole answers restart the body
    second = first_cut + (size - first_cut) // 2 if honour_range else first_cut
    assert [byte_range for _, byte_range in tries] == [None, f"bytes={first_cut}-", f"bytes={second}-"]


def test_train_stream_over_http_in_worker_processes_equals_the_local_one(server):
    labeled = write_set(server.root, "labeled", num_shards=3, per_shard=3, seed=8)

    def batches(spec):
        cfg = DataConfig(labeled=str(spec), num_classes=NUM_CLASSES, crop_size=32, num_workers=2, shuffle_buffer=4)
        return list(make_train_loader(cfg, "labeled", 2, rank=0, world_size=1, seed=3, epoch=1, steps=6))

    remote, local = batches(f"{server.url}/labeled"), batches(labeled)
    assert len(remote) == 6 and [b["key"] for b in remote] == [b["key"] for b in local]
    assert all((r["image"] == l["image"]).all() and (r["label"] == l["label"]).all() for r, l in zip(remote, local))
    assert {path for path, _, _ in server.requests} == {"labeled/manifest.json"} | {
        f"labeled/{shard.name}" for shard in labeled.glob("*.tar")}


def test_dead_shard_is_skipped_counted_and_named(server, caplog):
    val = write_set(server.root, "val", num_shards=3, per_shard=3, seed=2)
    server.cut["val/val-000001.tar"] = math.inf
    with caplog.at_level(logging.WARNING, logger="u2pl_scale.data.stream"):
        keys, _, bad = read_val(f"{server.url}/val", retries=2)
    assert keys == set_keys(val, skip=("val-000001.tar",)) and len(keys) == 6
    assert bad == {"bad_shard": 1}
    assert len(gets(server, "val/val-000001.tar")) == 3  # 1 + data.retries
    named = [r.getMessage() for r in caplog.records if f"{server.url}/val/val-000001.tar" in r.getMessage()]
    assert len(named) == 1 and "short read" in named[0] and "3 tries" in named[0]
    with pytest.raises(BadSample, match=re.escape(f"{server.url}/val/val-000001.tar")):
        read_val(f"{server.url}/val", retries=0, on_bad_sample="error")


@pytest.mark.parametrize("over_http", [False, True])
def test_verify_checksums_names_a_modified_shard(server, over_http, caplog):
    val = write_set(server.root, "val", num_shards=3, per_shard=3, seed=3)
    modify_padding(val / "val-000002.tar")
    spec = f"{server.url}/val" if over_http else val
    keys, _, bad = read_val(spec)
    assert keys == set_keys(val) and bad == {}  # the change is invisible to the reader itself
    with caplog.at_level(logging.WARNING, logger="u2pl_scale.data.stream"):
        keys, _, bad = read_val(spec, verify_checksums=True)
    assert keys == set_keys(val, skip=("val-000002.tar",)) and bad == {"bad_shard": 1}
    named = [r.getMessage() for r in caplog.records if "val-000002.tar" in r.getMessage()]
    assert len(named) == 1 and "sha256" in named[0]
    with pytest.raises(BadSample, match=r"sha256.*val-000002\.tar"):
        read_val(spec, verify_checksums=True, on_bad_sample="error")


def test_verify_checksums_needs_manifest_checksums(server):
    write_set(server.root, "val", num_shards=2, per_shard=2, seed=4)
    with pytest.raises(ValueError, match=r"data\.verify_checksums: shard .*val-000000\.tar has no sha256"):
        read_val(f"{server.url}/val/val-{{000000..000001}}.tar", verify_checksums=True)


@pytest.mark.parametrize("override, culprit", [("data.retries=-1", "data.retries"),
                                               ("data.retry_backoff_s=-0.5", "data.retry_backoff_s"),
                                               ("data.read_timeout_s=0", "data.read_timeout_s"),
                                               ("data.verify_checksums=maybe", "data.verify_checksums")])
def test_bad_read_settings_name_the_key(override, culprit):
    with pytest.raises(ConfigError, match=re.escape(culprit)):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_training_over_http_keeps_its_step_count_with_a_dead_shard(server, tmp_path, caplog):
    write_set(server.root, "labeled", num_shards=2, per_shard=4, seed=5)
    write_set(server.root, "unlabeled", num_shards=3, per_shard=4, seed=6)
    write_set(server.root, "val", num_shards=1, per_shard=2, seed=7)
    server.cut["unlabeled/unlabeled-000001.tar"] = math.inf
    overrides = [f"data.labeled={server.url}/labeled", f"data.unlabeled={server.url}/unlabeled",
                 f"data.val={server.url}/val", "data.retries=1", f"data.retry_backoff_s={BACKOFF}",
                 "data.verify_checksums=true", "data.steps_per_epoch=0", "data.unlabeled_size=0",
                 "data.batch_size_labeled=4", "data.batch_size_unlabeled=4", "data.num_workers=0",
                 "data.shuffle_buffer=1", "data.crop_size=48", "model.backbone=resnet10t", "train.epochs=1",
                 "train.progress_bar=false", "train.log_interval=1", "eval.num_pictures=0",
                 "method.contrastive.num_anchors=32", "method.contrastive.queue_size=2000",
                 f"train.run_dir={tmp_path / 'run'}"]
    with caplog.at_level(logging.WARNING, logger="u2pl_scale.data.stream"):
        summary = run_training(str(REPO / "configs" / "demo.yaml"), overrides)
    # steps come from the manifest's 12 unlabeled samples / batch 4, whatever is skipped while reading
    assert summary["steps"] == summary["total_steps"] == 12 // 4
    dead = summary["bad_samples"].get("bad_shard", 0)
    assert dead >= 1 and summary["bad_samples"] == {"bad_shard": dead}
    assert len(gets(server, "unlabeled/unlabeled-000001.tar")) == 2 * dead  # each skip after 1 + data.retries
    assert sum(f"{server.url}/unlabeled/unlabeled-000001.tar" in r.getMessage() for r in caplog.records) == dead
