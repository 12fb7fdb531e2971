"""Shared fixtures. The demo shards are built once, at the default location the demo config reads.

Layout: unit/ (one module or a few, in process), integration/ (training, ranks, launchers, clusters, servers,
benchmark scripts), gpu/ (needs CUDA), helpers/ (modules the tests import: `from digests import state_digests`),
cluster/ (the scripts that start real Slurm / Ray clusters). Each test gets the marker of its directory."""
import contextlib
import sys
from pathlib import Path

import u2pl_scale  # noqa: F401  (sets the CPU threading environment before torch loads)
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# the shared helper modules, importable by name in test modules and in the ranks they spawn (which inherit sys.path)
sys.path.insert(0, str(TESTS / "helpers"))

LAYERS = ("unit", "integration", "gpu")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Marks each test with its layer (unit, integration or gpu) from the directory it lives in."""
    for item in items:
        try:
            layer = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:  # a test file outside tests/ named on the command line
            continue
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(params=["cpu", "reference"])
def method_path(request):
    """Runs a method test with each implementation of the method's stages (u2pl_scale/method/stages.py) that runs
    here: the CPU stages (u2pl_scale/accel/cpu.py, what the trainer takes on CPU) and the reference stages of
    u2pl_scale/method (what a GPU runs, but for its Triton kernels, and what compiled code runs). Yields the
    Stages."""
    from u2pl_scale import accel

    return accel.select("cpu", implementation="auto" if request.param == "cpu" else "reference")


@pytest.fixture(scope="session")
def demo_shards() -> Path:
    """shards/demo with all four sets (full_labeled too, for semi_gain --full), rebuilt when missing, unfinished
    or from an older generator."""
    from u2pl_scale.data.demo import ensure_demo

    root = REPO / "shards" / "demo"
    ensure_demo(root, progress=False)
    return root


# ---- real clusters on this machine (tests/integration/test_slurm.py, test_ray.py) -------------------------------

SLURM_SCRIPT = REPO / "tests" / "cluster" / "slurm_local.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A REAL one-node Slurm started by tests/cluster/slurm_local.sh (installed with apt-get when missing) and
    stopped at the end of the session; one that the script started earlier is used and left running. Skips when
    not root, when the packages cannot be installed, or when a Slurm the script did not start is running (never
    adopted or disturbed); any other start failure fails the test."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root: tests/cluster/slurm_local.sh starts slurmctld/slurmd/munged")
    was_running = subprocess.run([str(SLURM_SCRIPT), "owned"], capture_output=True).returncode == 0
    if not was_running:
        proc = subprocess.run([str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=300)
        if proc.returncode in (2, 3, 5):
            pytest.skip(f"cannot start a local Slurm: {proc.stderr.strip().splitlines()[-1]}")
        if proc.returncode != 0:
            pytest.fail(f"tests/cluster/slurm_local.sh start failed (rc {proc.returncode}):\n{proc.stderr}")
    yield SLURM_SCRIPT
    if not was_running:
        subprocess.run([str(SLURM_SCRIPT), "stop"], capture_output=True, timeout=120)


# ---- four "hosts" on this machine (tests/integration/test_multinode.py): network namespaces, tests/cluster/netns.sh

SLURM_MULTI_SCRIPT = REPO / "tests" / "cluster" / "slurm_multinode.sh"
RAY_MULTI_SCRIPT = REPO / "tests" / "cluster" / "ray_multinode.sh"


@contextlib.contextmanager
def _four_node_cluster(script: Path, what: str):
    """Start a four-node cluster with its script unless one it started runs already (that one is used and left
    running); gives the script. Skips when not root, when the packages are missing, when namespaces of its names
    exist that it did not create, or when this machine allows no network namespaces; another failure fails."""
    import os
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip(f"four-node {what} tests need root: {script.name} creates network namespaces")
    # this interpreter's tools (ray, python) also where its environment is not activated
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHON=sys.executable)
    was_running = subprocess.run([str(script), "owned"], capture_output=True, env=env).returncode == 0
    if not was_running:
        proc = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=300, env=env)
        if proc.returncode in (2, 3, 5, 6):
            pytest.skip(f"cannot start a four-node {what}: {proc.stderr.strip().splitlines()[-1]}")
        if proc.returncode != 0:
            subprocess.run([str(script), "stop"], capture_output=True, timeout=120, env=env)  # half-started
            pytest.fail(f"tests/cluster/{script.name} start failed (rc {proc.returncode}):\n{proc.stderr}")
    try:
        yield script
    finally:
        if not was_running:
            subprocess.run([str(script), "stop"], capture_output=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def slurm_four_nodes():
    """A REAL four-node Slurm (tests/cluster/slurm_multinode.sh): slurmctld here, slurmd on hosts node1..4 (network
    namespaces); stopped, namespaces removed, at the end of the module. Yields the environment its Slurm commands
    need (SLURM_CONF: its own configuration, beside the one-node cluster's)."""
    import os
    import subprocess

    with _four_node_cluster(SLURM_MULTI_SCRIPT, "Slurm") as script:
        exports = subprocess.run([str(script), "env"], capture_output=True, text=True, check=True).stdout
        yield dict(os.environ, **dict(item.split("=", 1) for item in exports.split()[1:]))


@pytest.fixture(scope="module")
def ray_four_nodes():
    """A REAL four-node Ray (tests/cluster/ray_multinode.sh): the head on node1, workers on node2..4 (network
    namespaces), one CPU each; stopped, namespaces removed, at the end of the module. Yields its address."""
    import subprocess

    with _four_node_cluster(RAY_MULTI_SCRIPT, "Ray") as script:
        yield subprocess.run([str(script), "address"], capture_output=True, text=True, check=True).stdout.strip()
