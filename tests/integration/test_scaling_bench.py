"""benchmarks/scaling.py (issue 26 item 2): the bytes each collective of a training step moves, counted on real gloo
ranks running the trainer (W = 1, 2; 4 with U2PL_SCALING_TEST_WS=1,2,4), equal the script's model and what this file
computes by hand from the config and the model; the queue exchange gathers as many bytes at W = 2 as at W = 4; the
time model by hand."""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import scaling  # noqa: E402
from u2pl_scale.config import load_config  # noqa: E402

# 4 gloo ranks on 2 loaded cores take 25-60 s more: opt in with U2PL_SCALING_TEST_WS=1,2,4
MEASURED_WS = tuple(int(w) for w in os.environ.get("U2PL_SCALING_TEST_WS", "1,2").split(","))
STEPS = 2  # one log interval: the script's measure config logs every 2 steps
BYTE_KINDS = ("queue", "gradient", "teacher_bn", "ddp_buffers", "nonfinite", "metrics", "other")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, demo_shards):
    out = tmp_path_factory.mktemp("scaling") / "scaling.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--measure-ws",
                           ",".join(map(str, MEASURED_WS)), "--measure-steps", str(STEPS), "--json", str(out)],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_measured_bytes_equal_the_model_and_hand_counts(bench):
    stdout, result = bench
    measured = result["measured"]
    assert sorted(measured) == [str(w) for w in MEASURED_WS]
    for world, entry in measured.items():
        for kind in BYTE_KINDS:
            got, want = entry["measured"][kind], entry["model"][kind]
            assert (got["sent"], got["result"]) == (want["sent"], want["result"]), (world, kind)
            assert "uneven" not in got, (world, kind)  # the same payload on every step
        assert entry["measured"]["other"]["calls"] == 0, entry["measured"]["other"]  # nothing unmodelled
    assert all(v["calls"] == 0 for v in measured["1"]["measured"].values())  # one process: no collective
    assert "| 1 | any | 0 / 0 | 0 / 0 | 0 / 0 | yes |" in stdout and "| 2 | queue | 1 / 1 | 936000 / 936000 |" in stdout

    # by hand, from the config and the real model (CPU: plain BatchNorm, teacher statistics averaged)
    cfg = load_config(REPO / "configs" / "demo.yaml", scaling.MEASURE_OVERRIDES)
    classes, dim = cfg.data.num_classes, cfg.model.rep_dim
    caps = [cfg.method.contrastive.queue_size] * classes
    assert cfg.method.contrastive.queue_dtype == "float32" and not cfg.method.contrastive.queue_size_per_class
    from u2pl_scale.model import build_model

    model = build_model(cfg.model, cfg.data.num_classes)
    params = sum(p.numel() for p in model.parameters())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    buffers = sum(2 * 4 * m.num_features + 8 for m in bns)  # running mean and var (fp32), num_batches_tracked
    assert buffers == sum(b.numel() * b.element_size() for b in model.buffers())  # BN is all the model buffers
    for world in (w for w in MEASURED_WS if w > 1):
        got = measured[str(world)]["measured"]
        rows = sum(math.ceil(c / world) for c in caps)  # each class's budget, fewer than the pixels a rank has
        pixels = (cfg.data.batch_size_labeled + cfg.data.batch_size_unlabeled) * (cfg.data.crop_size // 4) ** 2
        assert pixels >= max(caps) // world
        assert got["queue"]["sent"] == rows * (dim + 1) * 4  # + the label column, fp32
        assert got["queue"]["result"] == world * rows * (dim + 1) * 4
        assert got["gradient"]["sent"] == 4 * params
        assert got["teacher_bn"]["sent"] == 4 * sum(2 * m.num_features for m in bns)
        assert got["ddp_buffers"]["sent"] == buffers
        assert got["nonfinite"]["sent"] == 4
        assert got["metrics"]["sent"] == 8 * (3 * classes + 4) + 4 and got["metrics"]["calls"] == 8
    # the queue exchange does not grow with the world: 6 x 600 rows from 2 ranks = 6 x 300 rows from 4
    at_4 = measured["4"]["measured"] if "4" in measured else \
        scaling.by_kind(scaling.collectives(cfg, 4, scaling.model_shapes(cfg), gpu=False))  # by the model
    assert measured["2"]["measured"]["queue"]["result"] == at_4["queue"]["result"] == 6 * 1200 * 65 * 4


def test_projected_queue_gradient_and_syncbn_by_hand():
    """The model for VOC (configs/voc_1464.yaml) on GPUs: 50000 queue rows for class 0, 30000 for the 20 others,
    256-d features + a label, fp32; the ResNet-101 DeepLabv3+ gradients; SyncBN, so no teacher statistics."""
    cfg = load_config(REPO / "configs" / "voc_1464.yaml")
    shapes = scaling.model_shapes(cfg)
    from u2pl_scale.model import build_model

    with torch.device("meta"):
        net = build_model(load_config(REPO / "configs" / "voc_1464.yaml", ["model.pretrained=false"]).model, 21)
    channels = [m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for world in (2, 4, 32, 1024):
        ops = {(o.kind, o.op): o for o in scaling.collectives(cfg, world, shapes, gpu=True)}
        rows = math.ceil(50000 / world) + 20 * math.ceil(30000 / world)  # a rank has 8 x 129 x 129 pixels, more
        assert ops["queue", "all_gather"].sent == rows * 257 * 4
        assert ops["queue", "all_gather"].result == world * rows * 257 * 4
        assert ops["gradient", "all_reduce"].sent == 4 * sum(p.numel() for p in net.parameters())
        gather = ops["syncbn", "all_gather"]  # the student's and the teacher's train-mode forwards
        assert (gather.calls, gather.sent) == (2 * len(channels), 2 * sum((2 * c + 1) * 4 for c in channels))
        assert gather.result == world * gather.sent
        assert ops["syncbn", "all_reduce"].sent == sum(2 * c * 4 for c in channels)  # the student's backward
        assert ("teacher_bn", "all_reduce") not in ops
    gathered = [scaling.by_kind(scaling.collectives(cfg, w, shapes, gpu=True))["queue"]["result"] for w in (2, 4)]
    assert gathered == [(50000 + 20 * 30000) * 257 * 4] * 2  # the same at W = 2 and W = 4
    assert scaling.collectives(cfg, 1, shapes, gpu=True) == []


def test_time_model_by_hand():
    """Wire bytes over the link plus 10 us per call per log2(W) level; the gradient hidden up to 40 % of compute."""
    args = argparse.Namespace(step_ms=100.0, backward_frac=0.4, latency_us=10.0, nvlink_gbps=450.0, ib_gbps=50.0,
                              gpus_per_node=8)
    ops = [scaling.Op("queue", "all_gather", 1, 10 ** 6, 32 * 10 ** 6),
           scaling.Op("gradient", "all_reduce", 4, 10 ** 8, 10 ** 8),
           scaling.Op("metrics", "all_reduce", 8, 1000, 1000, per="log")]
    got = scaling.project(ops, 32, args, log_interval=50)
    queue = 31 * 1e6 / 50e9 * 1e3 + 1 * 0.05  # ms: 31 peers' rows over IB, one call at depth 5
    grad = 2 * 31 / 32 * 1e8 / 50e9 * 1e3 + 4 * 0.05
    metrics = (2 * 31 / 32 * 1000 / 50e9 * 1e3 + 8 * 0.05) / 50
    assert got["ms"]["queue"] == pytest.approx(queue) and got["ms"]["gradient"] == pytest.approx(grad)
    assert got["ms"]["metrics"] == pytest.approx(metrics)
    assert got["efficiency_serial"] == pytest.approx(100 / (100 + queue + grad + metrics))
    assert got["efficiency_overlap"] == pytest.approx(100 / (100 + queue + metrics))  # grad (4.1 ms) < 40 ms
    assert got["queue_share_overlap"] == pytest.approx(queue / (100 + queue + metrics))
    within = scaling.project(ops[:1], 8, args, log_interval=50)  # one node: NVLink, depth 3
    assert within["ms"]["queue"] == pytest.approx(7 * 1e6 / 450e9 * 1e3 + 0.03)
    alone = scaling.project(ops, 1, args, log_interval=50)  # (no collective runs at W = 1 anyway)
    assert alone["efficiency_serial"] == alone["efficiency_overlap"] == 1.0


def test_a_measured_payload_off_the_model_fails_the_script(monkeypatch, capsys):
    """The script compares what it measured with its model: one byte off in one kind is a non-zero exit."""
    def measure(config, overrides, world, steps):
        cfg = load_config(config, overrides)
        got = scaling.by_kind(scaling.collectives(cfg, world, scaling.model_shapes(cfg), gpu=False))
        got["queue"]["sent"] += 1
        return got

    monkeypatch.setattr(scaling, "measure", measure)
    assert scaling.main(["--measure-ws", "2", "--ws", "2"]) == 1
    out = capsys.readouterr()
    assert "| 2 | queue | 1 / 1 | 936001 / 936000 |" in out.out and "**NO**" in out.out
    assert "MISMATCH W=2 queue" in out.err and "gradient" not in out.err
