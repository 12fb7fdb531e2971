"""End-to-end runs of the one training function on the demo shards (single process, 2 gloo ranks, resume)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from net import free_port
from u2pl_scale.config import load_config
from u2pl_scale.engine.trainer import train

REPO = Path(__file__).resolve().parents[2]
# 4 steps per epoch, 3 epochs: epoch 0 is the supervised warm-up, epochs 1-2 run the U2PL step.
QUICK = ["train.progress_bar=false", "data.steps_per_epoch=4", "train.epochs=3", "data.batch_size_labeled=4",
         "data.batch_size_unlabeled=4", "data.num_workers=0", "train.log_interval=1", "eval.num_pictures=2",
         "method.contrastive.num_anchors=32", "method.contrastive.queue_size=2000"]
# where a test does not look at the per-epoch evaluations: one, at the end (an evaluation costs about as much as
# four of these training steps)
END_EVAL = "eval.interval_epochs=99"


def run(tmp_path, *extra, name="run"):
    cfg = load_config(REPO / "configs" / "demo.yaml", QUICK + [f"train.run_dir={tmp_path / name}", *extra])
    return train(cfg), tmp_path / name


def one_shard_val(demo_shards, tmp_path):
    """A val set of the demo's first val shard only: its manifest, listing that shard, beside a link to it."""
    val = tmp_path / "val_one_shard"
    val.mkdir()
    manifest = json.loads((demo_shards / "val" / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["num_samples"] = manifest["shards"][0]["num_samples"]
    (val / "manifest.json").write_text(json.dumps(manifest))
    (val / manifest["shards"][0]["name"]).symlink_to(demo_shards / "val" / manifest["shards"][0]["name"])
    return val


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_demo_run_writes_a_complete_run_dir(demo_shards, tmp_path):
    summary, run_dir = run(tmp_path)
    assert summary["steps"] == 12 and summary["total_steps"] == 12
    assert summary["evaluated_model"] == "teacher"
    assert 0.0 <= summary["miou"] <= 1.0 and len(summary["per_class_iou"]) == 6
    for key in ("miou", "per_class_iou", "steps", "wall_s", "images_per_s", "eval_mode", "bad_samples"):
        assert key in summary
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.train.epochs == 3  # the resolved config reloads
    # demo.yaml asks for precision auto: bf16 on a CPU that runs it natively, else fp32, recorded as run
    from u2pl_scale.precision import native_bf16
    expected = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert resolved.train.precision == summary["precision"] == expected
    train_lines = [m for m in read_metrics(run_dir) if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == list(range(1, 13))
    assert {m["phase"] for m in train_lines[:4]} == {"sup-only"} and {m["phase"] for m in train_lines[4:]} == {"u2pl"}
    semi = train_lines[-1]
    assert semi["unsup"] > 0 and 0 < semi["reliable"] <= 1
    check_method_metrics(train_lines[4:], capacity=2000, num_classes=6)
    assert summary["empty_labeled_batches"] == 0
    # teacher_follow_epochs=1: through the first U2PL epoch (steps 5-8) the teacher's parameters are the
    # student's; the EMA starts after it
    mid = torch.load(run_dir / "checkpoints" / "step_00000008" / "state.pt", weights_only=True)
    end = torch.load(run_dir / "checkpoints" / "step_00000012" / "state.pt", weights_only=True)
    for name, value in mid["model"].items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.equal(mid["teacher"][name], value), name
    assert any(not torch.equal(end["teacher"][k], v) for k, v in end["model"].items() if v.is_floating_point())
    assert len([m for m in read_metrics(run_dir) if m["kind"] == "val"]) == 3  # one eval per epoch
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from PIL import Image
    with Image.open(run_dir / "val_predictions.png") as im:
        assert im.size[0] == 3 * 96 and im.size[1] >= 2 * 96
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000008", "step_00000012"]  # keep_checkpoints=2, no temporary left behind
    assert (run_dir / "best.pt").is_file()


def check_method_metrics(lines, capacity, num_classes):
    """The method's log values (one line per step here) hold together: the queue fill of each class is the sum of
    the rows pushed so far, capped at its capacity (an independent count from the log), and the rest are in range."""
    pushed_so_far = [0] * num_classes
    for m in lines:
        assert 0 <= m["classes_with_anchors"] <= m["classes_present"] <= num_classes
        assert 0.0 <= m["agreement"] <= 1.0 and 0 < m["drop_percent"] <= 20
        assert m["negatives_from_labeled"] >= 0 and m["negatives_from_unlabeled"] >= 0
        assert sum(m["queue_pushed"]) <= m["negatives_from_labeled"] + m["negatives_from_unlabeled"]
        pushed_so_far = [a + b for a, b in zip(pushed_so_far, m["queue_pushed"])]
        assert m["queue_fill"] == pytest.approx([min(n, capacity) / capacity for n in pushed_so_far], abs=1e-4)
        assert m["queues_overwritten"] == sum(n >= capacity for n in m["queue_pushed"])
    assert lines[-1]["negatives_from_labeled"] + lines[-1]["negatives_from_unlabeled"] > 0


def test_resume_from_a_mid_run_checkpoint_ends_at_the_same_step(demo_shards, tmp_path):
    full, full_dir = run(tmp_path, "train.keep_checkpoints=5", END_EVAL, name="full")
    mid = full_dir / "checkpoints" / "step_00000008"
    state = torch.load(mid / "state.pt", weights_only=True)
    assert state["step"] == 8 and state["semi_started"] and state["steps_since_copy"] == 4
    resumed, resumed_dir = run(tmp_path, f"train.resume={mid}", END_EVAL, name="resumed")
    assert resumed["steps"] == full["steps"] == 12
    assert resumed["resumed_from"] == str(mid)
    steps = [m["step"] for m in read_metrics(resumed_dir) if m["kind"] == "train"]
    assert steps == [9, 10, 11, 12]  # continued, not restarted
    # auto-resume of a finished run does no more steps
    again, _ = run(tmp_path, "train.resume=auto", END_EVAL, name="resumed")
    assert again["steps"] == 12


def test_run_with_the_method_compiled(demo_shards, tmp_path):
    """train.compile_method through the trainer (on CPU: the reference stages compiled, no CUDA graphs): the U2PL
    steps run and log the method's terms."""
    summary, run_dir = run(tmp_path, "train.compile_method=true", "train.epochs=2", END_EVAL)
    assert summary["steps"] == 8
    semi = [m for m in read_metrics(run_dir) if m["kind"] == "train" and m["phase"] == "u2pl"]
    assert len(semi) == 4 and all(m["unsup"] > 0 and m["contra"] > 0 and 0 < m["reliable"] <= 1 for m in semi)


def test_a_cpu_run_takes_the_cpu_stages_for_every_method_pass(demo_shards, tmp_path, monkeypatch):
    """The trainer's U2PL steps on CPU take all eight CPU stages (u2pl_scale/accel/cpu.py), once per step: none
    falls back to the reference through a dtype, layout or autograd mismatch in the real step."""
    from u2pl_scale.accel import cpu
    from u2pl_scale.method.stages import Stages

    names = [f.name for f in dataclasses.fields(Stages) if f.name != "name"]
    handled = dict.fromkeys(names, 0)

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU stage fell back to the reference")

    for name in names:
        function = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _n=name, _f=function, **k: (handled.__setitem__(_n, handled[_n] + 1),
                                                                              _f(*a, **k))[1])
    monkeypatch.setattr(cpu, "REFERENCE", Stages("refusing", **dict.fromkeys(names, refuse)))
    monkeypatch.setattr(cpu, "write_compacted", refuse)
    summary, _ = run(tmp_path, "train.epochs=2", "train.log_interval=100", END_EVAL)
    assert summary["steps"] == 8
    assert handled == dict.fromkeys(names, 4), handled  # each of the 4 U2PL steps


def test_method_implementation_reference_trains_with_the_reference_stages(demo_shards, tmp_path, monkeypatch):
    """train.method_implementation=reference on CPU: the trainer never builds the CPU stages."""
    from u2pl_scale.accel import cpu

    def refuse(*args, **kwargs):
        raise AssertionError("the CPU stages were built")

    monkeypatch.setattr(cpu, "cpu_stages", refuse)
    summary, _ = run(tmp_path, "train.epochs=2", "train.method_implementation=reference", END_EVAL)
    assert summary["steps"] == 8


def test_supervised_only_method(demo_shards, tmp_path):
    summary, run_dir = run(tmp_path, "method.name=supervised", "train.epochs=2", END_EVAL)
    assert summary["steps"] == 8 and summary["evaluated_model"] == "student"
    assert {m["phase"] for m in read_metrics(run_dir) if m["kind"] == "train"} == {"sup-only"}


def test_two_gloo_ranks_two_workers_on_uneven_shards(tmp_path):
    """2 ranks x 2 loader workers over an odd number of unlabeled shards: both ranks run every step (no hang)."""
    from u2pl_scale.data.demo import build_demo
    build_demo(tmp_path / "demo", samples_per_shard=48, progress=False)  # the demo's images, in smaller shards
    unlabeled = json.loads((tmp_path / "demo" / "unlabeled" / "manifest.json").read_text())
    assert len(unlabeled["shards"]) % 2 == 1  # 5 shards cannot split evenly over 2 x 2 workers
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "--nproc", "2", *QUICK,
           "train.epochs=2", END_EVAL, "data.num_workers=2", f"train.run_dir={run_dir}",
           *(f"data.{split}={tmp_path / 'demo' / split}" for split in ("labeled", "unlabeled", "val"))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["derived"]["global_batch_unlabeled"] == 8
    assert summary["queue_digests"][0] == summary["queue_digests"][1]
    assert "final teacher mIoU" in proc.stdout


def test_plain_torchrun_starts_the_same_training(demo_shards, tmp_path):
    run_dir = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "launchers" / "local.py"), *QUICK, "train.epochs=1",
           f"train.run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4


def test_bad_override_stops_with_the_key_named(tmp_path):
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "train.epochz=3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "train.epochz" in proc.stderr


@pytest.mark.parametrize("precision", ["bf16"])
def test_bf16_and_fp32_agree(demo_shards, tmp_path, precision):
    """Mixed precision changes the numbers only slightly: the first steps' losses agree within 5%."""
    # the losses are what is compared: one evaluation, at the end, of one val shard (on a CPU without native bf16,
    # where bf16 is emulated and ~26x slower, two full evaluations were half of this test's 110 s)
    val = one_shard_val(demo_shards, tmp_path)
    common = ["train.epochs=2", "data.steps_per_epoch=2", "method.sup_only_epoch=1", "train.channels_last=true",
              f"data.val={val}", END_EVAL]
    ref, ref_dir = run(tmp_path, *common, "train.precision=fp32", name="fp32")
    low, low_dir = run(tmp_path, *common, f"train.precision={precision}", name=precision)
    ref_lines = [m for m in read_metrics(ref_dir) if m["kind"] == "train"]
    low_lines = [m for m in read_metrics(low_dir) if m["kind"] == "train"]
    assert len(ref_lines) == len(low_lines) == 4
    for a, b in zip(ref_lines, low_lines):
        for term in ("sup", "unsup"):
            if a[term] > 0:
                assert b[term] == pytest.approx(a[term], rel=0.05), (a["step"], term)
