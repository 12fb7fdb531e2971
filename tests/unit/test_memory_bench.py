"""benchmarks/memory_long_run.py's growth figures, against a hand computation on made-up samples."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory_long_run as mlr  # noqa: E402


def test_growth_after_warmup_by_hand():
    # steps 100..1000; RSS 500 MB flat, except the warm-up (steps <= 200) and a 2 MB rise per 100 steps after
    samples = [{"step": s, "main_mb": (900.0 if s <= 200 else 500.0 + 2 * (s - 300) / 100), "workers_mb": 10.0,
                "workers": 1} for s in range(100, 1001, 100)]
    g = mlr.growth(samples, "main_mb", warmup_fraction=0.2)  # keeps steps > 200
    assert g["from_step"] == 300 and g["min"] == 500.0 and g["max"] == 514.0
    assert g["last_minus_first"] == 14.0
    assert abs(g["slope_mb_per_1000_steps"] - 20.0) < 1e-9  # 2 MB per 100 steps
    flat = mlr.growth(samples, "workers_mb", 0.2)
    assert flat["slope_mb_per_1000_steps"] == 0.0 and flat["last_minus_first"] == 0.0


def test_rss_of_this_process_is_read():
    import os

    assert mlr.rss_mb(os.getpid()) > 10
    assert mlr.rss_mb(2 ** 22 + 12345) is None  # no such process
