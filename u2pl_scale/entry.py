"""The entry every launcher calls: load config + dotted overrides, then train; and what launchers share (their
common arguments, the hooks they observe a run through, a run directory's checkpoints)."""
from __future__ import annotations

import argparse
from typing import Optional

from .config import load_config
from .engine.hooks import TrainHooks  # noqa: F401  (launchers subclass it from here)


def run_training(config_path: Optional[str], overrides: list[str], hooks: Optional[TrainHooks] = None) -> dict:
    from .engine.trainer import train
    cfg = load_config(config_path, overrides)
    return train(cfg, hooks)


def add_common_args(parser: argparse.ArgumentParser, default_config: Optional[str] = "configs/demo.yaml",
                    evaluate: bool = False) -> None:
    """The arguments every launcher shares: --config, the dotted overrides, and (cluster launchers) --evaluate,
    which turns the positional arguments into launchers/evaluate.py's."""
    parser.add_argument("--config", default=default_config, help="YAML config file (default: %(default)s)")
    if not evaluate:
        parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=3")
        return
    parser.add_argument("overrides", nargs="*", help="dotted config overrides passed through, e.g. train.epochs=3; "
                        "with --evaluate: launchers/evaluate.py's arguments, after --")
    parser.add_argument("--evaluate", action="store_true", help="evaluate a checkpoint instead of training")


def checkpoints_in(run_dir) -> list:
    """The checkpoint directories a run directory holds, oldest first (a launcher deciding whether to resume)."""
    from pathlib import Path

    from .engine.checkpoint import list_checkpoints

    return list_checkpoints(Path(run_dir) / "checkpoints")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="u2pl-scale worker: train with the given config")
    add_common_args(parser)
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_training(args.config, args.overrides)


if __name__ == "__main__":
    main()
