"""The entry every launcher calls: load config + dotted overrides, then train."""
from __future__ import annotations

import argparse
from typing import Optional

from .config import load_config
from .engine.hooks import TrainHooks


def run_training(config_path: Optional[str], overrides: list[str], hooks: Optional[TrainHooks] = None) -> dict:
    from .engine.trainer import train
    cfg = load_config(config_path, overrides)
    return train(cfg, hooks)


def add_common_args(parser: argparse.ArgumentParser, default_config: Optional[str] = "configs/demo.yaml") -> None:
    parser.add_argument("--config", default=default_config, help="YAML config file (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=3")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="u2pl-scale worker: train with the given config")
    add_common_args(parser)
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_training(args.config, args.overrides)


if __name__ == "__main__":
    main()
