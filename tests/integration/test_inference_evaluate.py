"""launchers/evaluate.py and the self-describing checkpoints it reads (issue 21)."""
import json
import subprocess
import sys

import pytest
import torch

from inference_helpers import REPO, launcher, one_shard_val, summary, trained_run
from u2pl_scale.inference.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint

VAL = str(REPO / "shards" / "demo" / "val")


@pytest.fixture(scope="module")
def run_dir():
    return trained_run()


def test_checkpoints_describe_themselves(run_dir):
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)  # plain types only
    meta = best["meta"]
    assert meta["format"] == "u2pl-scale/1" and meta["num_classes"] == 6 and meta["ignore_index"] == 255
    assert meta["model"]["backbone"] == "resnet10t" and meta["evaluated_model"] == "teacher"
    assert meta["step"] == best["step"] == 10 and len(meta["mean"]) == 3 and len(meta["std"]) == 3
    assert "class_names" in meta and "backbone: resnet10t" in meta["config"]
    state_file = resolve_checkpoint(run_dir / "checkpoints")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    assert state["meta"]["format"] == "u2pl-scale/1" and state["meta"]["evaluated_model"] == "teacher"
    # a run dir resolves to best.pt; a checkpoint's state.pt gives its teacher, here the same network as best.pt
    assert resolve_checkpoint(run_dir) == run_dir / "best.pt"
    a, b = load_checkpoint(run_dir), load_checkpoint(state_file)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_old_and_foreign_files_are_refused_naming_file_and_what_is_missing(run_dir, tmp_path):
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({"model": best["model"], "step": 1, "miou": 0.5}, old)
    with pytest.raises(CheckpointError, match=r"old\.pt: no 'meta' record"):
        load_checkpoint(old)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a u2pl-scale checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a u2pl-scale checkpoint"):
        load_checkpoint(text)
    other = dict(best, meta=dict(best["meta"], format="other/2"))
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: meta format 'other/2'"):
        load_checkpoint(tmp_path / "other.pt")
    partial = dict(best, meta={k: v for k, v in best["meta"].items() if k not in ("mean", "std")})
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial\.pt: meta lacks mean, std"):
        load_checkpoint(tmp_path / "partial.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="empty_run: a directory without best.pt"):
        load_checkpoint(tmp_path / "empty_run")
    # the launcher turns it into a one-line error and exit code 2
    assert launcher("evaluate").main(["--checkpoint", str(old), "--data", VAL]) == 2


def test_evaluate_reproduces_the_trainers_final_figure(run_dir, tmp_path, capsys):
    expected = summary(run_dir)
    assert expected["miou"] == expected["best_miou"]  # one evaluation: best.pt is the final one
    out = tmp_path / "eval"
    assert launcher("evaluate").main(["--checkpoint", str(run_dir), "--data", VAL, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["miou"] == expected["miou"]  # exactly: same mode, same precision, same batching
    assert list(rep["per_class_iou"].values()) == expected["per_class_iou"]
    assert rep["eval_mode"] == expected["eval_mode"] == "whole" and rep["scales"] == [1.0] and not rep["flip"]
    assert rep["images"] == 128 and rep["model"] == "teacher"
    conf = torch.tensor(rep["confusion"])
    assert conf.shape == (6, 6) and rep["pixel_accuracy"] == pytest.approx(float(conf.diag().sum() / conf.sum()))
    assert (out / "confusion.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert f"mIoU {100 * expected['miou']:.2f} (whole, scales 1)" in printed and "triangle" in printed
    assert list(rep["per_class_iou"]) == ["background", "disc", "square", "triangle", "ring", "cross"]  # manifest


def test_multi_scale_flip_sliding_and_center_are_recorded(run_dir, tmp_path):
    ev = launcher("evaluate")
    out = tmp_path / "ms"
    val = str(one_shard_val(tmp_path))
    assert ev.main(["--checkpoint", str(run_dir), "--data", val, "--mode", "sliding", "--crop", "80",
                    "--scales", "0.75", "--flip", "--precision", "fp32", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_mode"] == "sliding" and rep["scales"] == [0.75] and rep["flip"]
    assert rep["setting"]["crop"] == 80 and rep["setting"]["precision"] == "fp32" and 0.0 <= rep["miou"] <= 1.0
    out = tmp_path / "center"
    assert ev.main(["--checkpoint", str(run_dir), "--data", val, "--mode", "center", "--crop", "48",
                    "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_mode"] == "center" and rep["images"] == 64 and rep["pixels"] <= 64 * 48 * 48


def test_two_gloo_ranks_give_the_same_confusion_matrix(run_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    val = str(one_shard_val(tmp_path))
    assert launcher("evaluate").main(["--checkpoint", str(run_dir), "--data", val, "--out", str(one)]) == 0
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "evaluate.py"), "--checkpoint", str(run_dir),
                           "--data", val, "--nproc", "2", "--out", str(two)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert b["world_size"] == 2 and b["images"] == 64
    assert b["confusion"] == a["confusion"] and b["miou"] == a["miou"]
