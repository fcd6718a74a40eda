"""The ``funnel`` command line. Each subcommand lives in its own module exposing ``register``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules under launch/ that add a subcommand: each defines register(subparsers) and sets
# `func` (a callable taking the parsed args and returning an exit code) on its parser.
COMMAND_MODULES = [
    "launch.doctor",
    "launch.data_cmd",
    "launch.train_cmd",
    "launch.plan_cmd",
    "launch.demo_cmd",
    "launch.serve_cmd",
    "launch.export_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funnel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # faiss logs every CPU-specific build it fails to find before loading the generic one
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
