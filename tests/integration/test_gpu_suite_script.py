"""benchmarks/gpu_suite.sh must fit a lent GPU's minutes: a part starts only when its expected time fits in what is
left of the budget, parts are skipped by name in the summary (never silently), and CUDA-only parts are skipped in
its CPU dry run. The dry run here runs one real part (the method's host cost), so the script's commands are checked
against the benchmarks' real arguments."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def suite(tmp_path, budget, only):
    env = dict(os.environ, GPU_SUITE_DRY="1", GPU_SUITE_BUDGET_S=str(budget), GPU_SUITE_ONLY=only, OUT=str(tmp_path))
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (tmp_path / "summary.txt").read_text().splitlines()


def test_parts_run_within_the_budget_and_cuda_only_parts_are_skipped_in_a_dry_run(tmp_path):
    summary = suite(tmp_path, 600, "host_cost breakdown_2x2_captured_method")
    assert summary[0] == "=== breakdown_2x2_captured_method: skipped in a dry run (CUDA only)"
    assert summary[1] == "=== host_cost: python3 benchmarks/method_overhead.py --host-cost"
    assert summary[2].startswith("=== host_cost: rc=0 in ")
    assert len(summary) == 3
    assert "| reference |" in (tmp_path / "all.log").read_text()


def test_a_part_that_does_not_fit_the_budget_left_is_named_as_skipped(tmp_path):
    summary = suite(tmp_path, 5, "host_cost overhead_voc")
    assert len(summary) == 2
    assert summary[0].startswith("=== overhead_voc: skipped, ")
    assert "expected 30 s: python3 benchmarks/method_overhead.py" in summary[0]
    assert summary[1].startswith("=== host_cost: skipped, ")
    assert not (tmp_path / "all.log").exists()
