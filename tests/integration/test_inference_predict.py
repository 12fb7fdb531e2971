"""launchers/predict.py on images of every kind a user has, and the Predictor behind it (issue 21)."""
import numpy as np
import pytest
import torch
from PIL import Image

from inference_helpers import launcher, trained_run
from u2pl_scale.engine.evaluate import sliding_logits
from u2pl_scale.inference.checkpoint import load_checkpoint
from u2pl_scale.inference.images import load_rgb
from u2pl_scale.inference.predictor import Predictor


@pytest.fixture(scope="module")
def run_dir():
    return trained_run()


def make_inputs(folder):
    """One image of each kind, plus a corrupt file; returns {name: expected (H, W) of its mask}."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[:, :, 0]).save(folder / "grey.png")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (50, 70, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (33, 45), dtype=np.uint16)).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: the displayed image is 70 high, 50 wide
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)).save(folder / "sub" / "large.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return {"rgb": (50, 70), "grey": (50, 70), "rgba": (50, 70), "palette": (50, 70), "deep16": (33, 45),
            "rotated": (70, 50), "sub/large": (150, 260)}


def test_predict_writes_a_mask_for_every_readable_image(run_dir, tmp_path, capsys):
    expected = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    code = launcher("predict").main(["--checkpoint", str(run_dir), "--input", str(tmp_path / "in"), "--out",
                                     str(out), "--overlay", "--batch", "2", "--max-whole", "128", "--no-progress"])
    assert code == 0  # at least one mask written: failures are listed, not fatal
    for name, (h, w) in expected.items():
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.size == (w, h), name
        assert np.asarray(mask).max() < 6
        assert Image.open(out / "overlays" / f"{name}.png").size == (w, h)
    assert (out / "contact_sheet.png").is_file()
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporaries
    failed = (out / "failed.txt").read_text()
    assert "broken.jpg" in failed and len(failed.splitlines()) == 1
    printed = capsys.readouterr().out
    assert "7 of 8 images written" in printed and "1 failed" in printed and "broken.jpg" in printed


def test_mask_is_the_predictors_and_large_images_run_in_windows(run_dir, tmp_path):
    expected = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert launcher("predict").main(["--checkpoint", str(run_dir), "--input", str(tmp_path / "in" / "rgb.jpg"),
                                     str(tmp_path / "in" / "sub" / "*.png"), "--out", str(out), "--max-whole",
                                     "128", "--precision", "fp32", "--no-progress"]) == 0
    loaded = load_checkpoint(run_dir)
    predictor = Predictor(loaded.model, loaded.meta, mode="whole", device="cpu", precision="fp32")
    image = torch.from_numpy(load_rgb(tmp_path / "in" / "rgb.jpg")).permute(2, 0, 1)[None]
    assert np.array_equal(np.asarray(Image.open(out / "rgb.png")), predictor.predict(image)[0].numpy())
    large = torch.from_numpy(load_rgb(tmp_path / "in" / "sub" / "large.png")).permute(2, 0, 1)[None]
    sliding = predictor.predict(large, mode="sliding")[0].numpy()
    assert np.array_equal(np.asarray(Image.open(out / "large.png")), sliding)
    assert expected["sub/large"] == sliding.shape


def test_one_scale_without_flip_is_the_trainers_sliding_evaluation(run_dir):
    loaded = load_checkpoint(run_dir)
    predictor = Predictor(loaded.model, loaded.meta, mode="sliding", crop=64, stride_rate=0.5, device="cpu",
                          precision="fp32", channels_last=False)
    images = torch.randint(0, 256, (2, 3, 90, 120), dtype=torch.uint8)
    x = (images.float() - torch.tensor(loaded.meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        loaded.meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = sliding_logits(loaded.model, x, 6, 64, 0.5)
    assert torch.allclose(predictor.logits(images), reference, atol=1e-5)
    multi = Predictor(loaded.model, loaded.meta, mode="whole", scales=[0.5, 1.0, 1.5], flip=True, device="cpu",
                      precision="fp32")
    probs = multi.logits(images)
    assert probs.shape == (2, 6, 90, 120) and torch.allclose(probs.sum(1), torch.ones(2, 90, 120), atol=1e-4)


def test_exit_codes_when_nothing_or_something_fails(run_dir, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    predict = launcher("predict")
    args = ["--checkpoint", str(run_dir), "--out", str(tmp_path / "out"), "--no-progress"]
    assert predict.main(args + ["--input", str(tmp_path / "bad")]) == 1  # nothing written
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "bad" / "ok.png")
    assert predict.main(args + ["--input", str(tmp_path / "bad")]) == 0
    assert (tmp_path / "out" / "ok.png").is_file()
    assert predict.main(args + ["--input", str(tmp_path / "bad"), "--strict"]) == 1
    assert predict.main(args + ["--input", str(tmp_path / "nowhere" / "*.jpg")]) == 2
