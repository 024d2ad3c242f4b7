"""The ``harness`` command: ``train`` and ``ckpt ...``."""

from __future__ import annotations

import argparse
import logging
import sys

from harness import config
from harness.errors import CheckpointError, ConfigError, HarnessError, StorageError

log = logging.getLogger("harness")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Fault-tolerant distributed training for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run training (under torchrun for several processes)")
    p.add_argument("--config", help="TOML config file (defaults are used for anything it leaves out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    from harness.ckpt_cli import add_ckpt_parser
    add_ckpt_parser(sub)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from harness import trainer
    try:
        cfg = config.load(args.config, args.overrides)
        return trainer.train(cfg)
    except ConfigError as exc:
        print(f"harness: config error: {exc}", file=sys.stderr)
        return trainer.EXIT_CONFIG
    except (StorageError, CheckpointError) as exc:
        print(f"harness: checkpoint error: {exc}", file=sys.stderr)
        return trainer.EXIT_CHECKPOINT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return run_train(args)
    from harness.ckpt_cli import run_ckpt
    try:
        return run_ckpt(args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 1
