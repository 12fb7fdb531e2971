"""What a run logs between log steps: device sums read once per log interval, and the method's diagnostics."""
from __future__ import annotations

import torch

from .. import dist
from ..config import Config
from ..method import diagnostics
from ..method.queues import ClassQueues
from ..method.reliability import drop_percent


class Meter:
    """Sums device tensors between log steps; reads them back to the host only when asked. Means, except the
    `COUNTED` terms, which are reported as counts over the interval and kept as run totals."""

    # labeled batches with every pixel ignored (their supervised loss is 0); steps skipped as not finite
    COUNTED = ("sup_empty", "nonfinite")

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.totals: dict[str, float] = {k: 0.0 for k in self.COUNTED}

    def add(self, values: dict) -> None:
        for k, v in values.items():
            if torch.is_tensor(v):
                self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach().clone()
        self.count += 1

    def read(self) -> dict:
        out = {k: float(v) if k in self.COUNTED else float(v) / max(1, self.count) for k, v in self.sums.items()}
        for k in self.COUNTED:
            self.totals[k] += out.get(k, 0.0)
        self.sums, self.count = {}, 0
        return out


def method_metrics(terms: dict, queues: ClassQueues, progress: float, cfg: Config, world: int) -> dict:
    """What the method did at a log step (method/diagnostics.py), summed over ranks (every rank logs at the same
    steps, so the collectives match)."""
    diag = {k: dist.all_reduce_sum(v.clone()) for k, v in terms["diag"].items()}
    metrics = diagnostics.summarize(diag, queues.capacities, queues.fill, world)
    metrics["drop_percent"] = drop_percent(progress, cfg.method.drop_percent_start)
    return metrics
