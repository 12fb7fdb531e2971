from pathlib import Path

from setuptools import find_packages, setup

extras = {
    "ray": ["ray[train]>=2.9"],
    "deepspeed": ["deepspeed>=0.14"],
    "slurm": ["submitit>=1.5"],
    # launchers/export.py --format onnx (torch's TorchScript-based ONNX exporter) and the tests that run it
    "export": ["onnx>=1.15", "onnxruntime>=1.17"],
    "test": ["pytest>=7", "pytest-timeout>=2", "pytest-xdist>=3", "onnx>=1.15", "onnxruntime>=1.17"],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="u2pl-scale",
    version="0.1.0",
    description="U2PL semi-supervised semantic segmentation as a distributed, cluster-scale trainer",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["u2pl_scale", "u2pl_scale.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # torch.library.custom_op (u2pl_scale/accel/triton_kernels.py); tested on 2.11 (GPU) and 2.14 (CPU)
        "torchvision>=0.19",
        "timm>=0.9",
        "webdataset>=0.2.86",
        "pyyaml>=6",
        "tqdm>=4",
        "tensorboard>=2.12",
        "numpy>=1.24",
        "pillow>=9",
        "safetensors>=0.4",
    ],
    extras_require=extras,
)
