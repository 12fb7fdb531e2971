"""benchmarks/step_breakdown.py at a tiny size: it builds a Trainer from the config and times Trainer.train_step (the
step training runs), and every part of its breakdown gets a time; --profile-step prints the top ops of one more step."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_step_breakdown_times_the_trainers_step_and_every_part():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_breakdown.py"), "--backbone", "resnet10t",
                           "--crop", "33", "--steps", "1", "--warmup", "1", "--batch", "1",
                           "--profile-step", "5"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([-\d.]+) \|", done.stdout, re.M))
    for part in ("data wait", "teacher forward", "student fwd+bwd", "method work", "optimizer+EMA",
                 "real step (Trainer.train_step, no inner syncs)", "real step without the method work, interleaved"):
        assert float(rows[part]) > 0, part
    assert float(rows["model GFLOP per real step (torch.utils.flop_counter)"]) > 0
    # --profile-step: one more real step under the profiler, its top ops by self CPU time here (GPU time on a GPU)
    profiled = done.stdout.split("one real step, profiled: ")[1]
    assert "top 5 by self_cpu_time_total" in profiled.splitlines()[0]
    assert re.search(r"^\s+aten::\w+", profiled, re.M), profiled[:2000]
