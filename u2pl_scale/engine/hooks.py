"""Callbacks through which a launcher (Ray Train, Slurm) observes and steers the one training function."""
from __future__ import annotations


class TrainHooks:
    """Default hooks do nothing; launchers subclass what they need."""

    def on_log(self, step: int, metrics: dict) -> None:
        """Every log interval, on every rank."""

    def on_checkpoint(self, step: int, ckpt_dir: str, metrics: dict) -> None:
        """On every rank, after a checkpoint directory has been written completely."""

    def should_stop(self) -> bool:
        """Polled once per step (host-side flag, e.g. preemption); True ends the run after a checkpoint."""
        return False
