"""benchmarks/method_overhead.py's GPU-free measures of the eager device path: its op count on the meta device
(--count-ops) and its host time on CPU (--host-cost, which runs the device path through paths.device_path_on_cpu).
The two run the method on different devices and count independently: equal counts show that the CPU run takes
the path a GPU takes, op for op."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "method_overhead.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_host_cost_runs_the_device_path_op_for_op():
    meta = run("--count-ops")
    meta_ops = int(re.search(r"^\| voc \| (\d+) \|$", meta, re.M).group(1))
    host_cost = run("--host-cost", "--steps", "20", "--warmup", "2")
    rows = dict(re.findall(r"^\| (device|host) \| (\d+) \| [\d.]+ \|", host_cost, re.M))
    assert int(rows["device"]) == meta_ops
    assert int(rows["host"]) != meta_ops  # the CPU host path is a different sequence of ops
    assert 100 < meta_ops < 400
