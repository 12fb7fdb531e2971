"""Shared fixtures. The demo shards are built once, at the default location the demo config reads."""
from pathlib import Path

import u2pl_scale  # noqa: F401  (sets the CPU threading environment before torch loads)
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["host", "device"])
def method_path(request):
    """Runs a method test on both code paths (u2pl_scale/method/paths.py): the CPU host path, and the device path
    (the one a GPU runs) taken eagerly on CPU."""
    from u2pl_scale.method.paths import device_path_on_cpu

    if request.param == "host":
        yield "host"
    else:
        with device_path_on_cpu():
            yield "device"


@pytest.fixture(scope="session")
def demo_shards() -> Path:
    """shards/demo with all four sets (full_labeled too, for semi_gain --full), rebuilt when missing, unfinished
    or from an older generator."""
    from u2pl_scale.data.demo import ensure_demo

    root = REPO / "shards" / "demo"
    ensure_demo(root, progress=False)
    return root


# ---- real clusters on this machine (tests/test_slurm.py, tests/test_ray.py) ------------------------------------

SLURM_SCRIPT = REPO / "tests" / "cluster" / "slurm_local.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A REAL one-node Slurm started by tests/cluster/slurm_local.sh (installed with apt-get when missing) and
    stopped at the end of the session; one that was already running is used and left running.
    Skips only when not root or when the packages cannot be installed; any other start failure fails the test."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root: tests/cluster/slurm_local.sh starts slurmctld/slurmd/munged")
    was_running = subprocess.run([str(SLURM_SCRIPT), "status"], capture_output=True).returncode == 0
    if not was_running:
        proc = subprocess.run([str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=300)
        if proc.returncode in (2, 3):
            pytest.skip(f"cannot start a local Slurm: {proc.stderr.strip().splitlines()[-1]}")
        if proc.returncode != 0:
            pytest.fail(f"tests/cluster/slurm_local.sh start failed (rc {proc.returncode}):\n{proc.stderr}")
    yield SLURM_SCRIPT
    if not was_running:
        subprocess.run([str(SLURM_SCRIPT), "stop"], capture_output=True, timeout=120)
