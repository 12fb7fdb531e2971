"""launchers/export.py: ONNX (run in onnxruntime) and TorchScript (run in torch) against the eager model, at two
image sizes, batch 2 (issue 21)."""
import json
import warnings

import numpy as np
import pytest
import torch

from inference_helpers import launcher, trained_run
from u2pl_scale.inference.checkpoint import load_checkpoint
from u2pl_scale.inference.export import ExportModel
from u2pl_scale.inference.predictor import Predictor

SIZES = [(48, 80), (101, 67)]


@pytest.fixture(scope="module")
def eager():
    run_dir = trained_run()
    loaded = load_checkpoint(run_dir)
    return run_dir, loaded, ExportModel(loaded.model, loaded.meta["mean"], loaded.meta["std"]).eval()


def images(h, w):
    return torch.randint(0, 256, (2, 3, h, w), generator=torch.Generator().manual_seed(h * w)).float()


def check(run, eager_model, loaded):
    """Exported logits match the eager wrapper's, and its masks the Predictor's (fp32, whole image)."""
    predictor = Predictor(loaded.model, loaded.meta, mode="whole", device="cpu", precision="fp32",
                          channels_last=False)
    for h, w in SIZES:
        x = images(h, w)
        with torch.no_grad():
            reference = eager_model(x)
        got = run(x)
        assert got.shape == (2, 6, h, w)
        assert np.abs(got - reference.numpy()).max() < 1e-4
        assert np.array_equal(reference.argmax(1).numpy(), predictor.predict(x.to(torch.uint8)).numpy())


def test_torchscript_export_matches_eager(eager, tmp_path):
    run_dir, loaded, eager_model = eager
    out = tmp_path / "model.ts"
    assert launcher("export").main(["--checkpoint", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        scripted = torch.jit.load(str(out))
    side = json.loads(out.with_name("model.ts.json").read_text())
    assert side["output"]["shape"][1] == 6 and side["meta"]["format"] == "u2pl-scale/1"

    def run(x):
        with torch.no_grad():
            return scripted(x).numpy()
    check(run, eager_model, loaded)


def test_onnx_export_matches_eager(eager, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[export]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")
    run_dir, loaded, eager_model = eager
    out = tmp_path / "model.onnx"
    assert launcher("export").main(["--checkpoint", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [d.name for d in session.get_inputs()] == ["images"]
    check(lambda x: session.run(None, {"images": x.numpy()})[0], eager_model, loaded)
