"""launchers/slurm.py: a task that fails after Slurm began stopping its job (requeue, cancel: SIGTERM) waits for
Slurm's SIGKILL instead of recording the failure as the job's result (tests/integration/test_multinode.py saw
`--follow` report a requeued 4-node job as failed that way)."""
import importlib.util
import os
import signal
import threading
import time
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("slurm_launcher", Path(__file__).resolve().parents[2] / "launchers"
                                              / "slurm.py")
slurm = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(slurm)


def fail():
    raise RuntimeError("Connection closed by peer")


def test_a_failure_outside_a_stop_is_raised_at_once():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="closed by peer"):
        slurm.run_unless_stopped(fail, threading.Event(), grace_s=5.0)
    assert time.monotonic() - start < 1.0
    assert slurm.run_unless_stopped(lambda: 42, threading.Event()) == 42


def test_a_failure_during_a_stop_waits_for_the_kill_then_raises(capsys):
    stopping = threading.Event()
    stopping.set()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="closed by peer"):
        slurm.run_unless_stopped(fail, stopping, grace_s=0.5)
    assert time.monotonic() - start >= 0.5
    assert "waiting for Slurm to end it" in capsys.readouterr().err


def test_sigterm_sets_the_event_and_reaches_the_handler_installed_before():
    seen = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # as submitit's bypass
    try:
        stopping = slurm.note_sigterm()
        assert not stopping.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stopping.is_set() and seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)
