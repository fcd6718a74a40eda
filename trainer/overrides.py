"""The ``--set KEY=VALUE`` option of every command that takes a run config (``python -m trainer``,
``funnel train / plan / export``); :func:`trainer.config.load_config` applies the values. A module of
its own, without torch, so that building the ``funnel`` command line stays light."""

from __future__ import annotations

import argparse


def add_override_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, the values :func:`load_config` takes."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )
