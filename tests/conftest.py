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


def require_native_kernels():
    """Fails the test if the fused CPU kernels (u2pl_scale/method/native.py) cannot be built where a C compiler
    exists; skips it where none does (they are an optional accelerator)."""
    from u2pl_scale.method import native

    if native.library() is None:
        if native._compiler() is None:
            pytest.skip("no C compiler: the fused CPU kernels cannot be built here")
        pytest.fail(f"the fused CPU kernels did not build: {native._STATE.get('reason')}")


NATIVE_KERNELS = ("entropy", "ce_grad", "anchor_negatives", "prepare_rows", "push", "negative_mask")


def count_kernel_calls(monkeypatch) -> dict:
    """Wraps each wrapper of method/native.py: the returned dict counts, per kernel, the calls it handled (not
    handed back to torch ops)."""
    from u2pl_scale.method import native

    handled = {}
    for name in NATIVE_KERNELS:
        def counted(*args, _name=name, _function=getattr(native, name), **kwargs):
            result = _function(*args, **kwargs)
            handled[_name] = handled.get(_name, 0) + (result is not None and result is not False)
            return result
        monkeypatch.setattr(native, name, counted)
    return handled


@pytest.fixture(params=["native", "torch-ops"])
def cpu_kernels(request, monkeypatch):
    """Runs a CPU host-path test twice: with the fused C kernels, and with the torch ops they stand in for."""
    from u2pl_scale.method import native

    monkeypatch.setattr(native, "ENABLED", request.param == "native")
    if request.param == "native":
        require_native_kernels()
    return request.param


@pytest.fixture(params=["host", "host-torch-ops", "device"])
def method_path(request, monkeypatch):
    """Runs a method test on every code path (u2pl_scale/method/paths.py): the CPU host path with its fused C
    kernels (method/native.py) and with torch ops only, and the device path (the one a GPU runs) taken eagerly on
    CPU."""
    from u2pl_scale.method import native
    from u2pl_scale.method.paths import device_path_on_cpu

    monkeypatch.setattr(native, "ENABLED", request.param == "host")
    if request.param == "host":
        require_native_kernels()
    if request.param != "device":
        yield request.param
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
