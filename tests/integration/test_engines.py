"""DDP and DeepSpeed engines on 2 gloo ranks: same seed, same data -> the same losses; queues identical on ranks."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from digests import logged, state_digests

REPO = Path(__file__).resolve().parents[2]
# 3 supervised warm-up steps then 3 U2PL steps, fp32 so that engines can be compared tightly.
COMMON = ["train.progress_bar=false", "data.steps_per_epoch=3", "train.epochs=2", "data.batch_size_labeled=2",
          "data.batch_size_unlabeled=2", "data.num_workers=0", "train.log_interval=1", "train.precision=fp32",
          "method.contrastive.num_anchors=32", "method.contrastive.queue_size=500", "eval.num_pictures=0",
          "eval.interval_epochs=2"]  # one evaluation, at the end
# Per-step losses of two engines agree to this relative tolerance (they differ only in the order in which
# gradients are summed over ranks, which changes the last bits and then grows over a few SGD steps).
LOSS_RTOL = 2e-3


def launch(run_dir: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "--nproc", "2", *COMMON,
           f"train.run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["losses"] = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                         if m["kind"] == "train"]
    return summary


@pytest.fixture(scope="module")
def ddp_run(demo_shards, tmp_path_factory):
    # contiguous like the DeepSpeed engine (which does not take channels-last), so the comparison sees only the
    # engines: a layout changes convolution rounding, which a few U2PL steps (entropy thresholds, sampled
    # anchors) amplify past the tolerance
    return launch(tmp_path_factory.mktemp("ddp") / "run", "engine.backend=ddp", "train.channels_last=false")


def test_ddp_queues_identical_on_both_ranks(ddp_run):
    assert ddp_run["world_size"] == 2 and ddp_run["steps"] == 6
    digests = ddp_run["queue_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_matches_ddp(ddp_run, tmp_path, stage):
    ds = launch(tmp_path / f"ds{stage}", "engine.backend=deepspeed", f"engine.zero_stage={stage}")
    assert ds["backend"] == "deepspeed" and ds["steps"] == ddp_run["steps"] == 6
    assert ds["queue_digests"][0] == ds["queue_digests"][1]
    assert len(ds["losses"]) == len(ddp_run["losses"]) == 6
    for a, b in zip(ddp_run["losses"], ds["losses"]):
        for term in ("loss", "sup", "unsup", "contra"):
            assert b[term] == pytest.approx(a[term], rel=LOSS_RTOL, abs=1e-6), (a["step"], term)
    assert ds["miou"] == pytest.approx(ddp_run["miou"], abs=0.02)


@pytest.mark.slow
def test_deepspeed_zero1_resume_is_bit_exact(demo_shards, tmp_path):
    """The DeepSpeed engine's own checkpoint files are part of the project's resume, and a ZeRO-1 run continued
    from its step-3 checkpoint (the supervised warm-up's end) ends bit for bit where the uninterrupted run ends."""
    ds = ["engine.backend=deepspeed", "engine.zero_stage=1", "train.keep_checkpoints=5"]
    full = launch(tmp_path / "full", *ds)
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000003"
    assert (ckpt / "deepspeed").is_dir() and (ckpt / "state.pt").is_file()
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / ckpt.name)  # as a run killed after step 3 left it
    resumed = launch(tmp_path / "resumed", *ds, "train.resume=auto")
    assert resumed["steps"] == 6 and resumed["resumed_from"].endswith("step_00000003")
    assert state_digests(tmp_path / "resumed" / "checkpoints" / "step_00000006" / "state.pt") == \
        state_digests(tmp_path / "full" / "checkpoints" / "step_00000006" / "state.pt")
    assert logged(tmp_path / "resumed") == logged(tmp_path / "full", after_step=3)
    assert resumed["queue_digests"] == full["queue_digests"] and resumed["miou"] == full["miou"]
