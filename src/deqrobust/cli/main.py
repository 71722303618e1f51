"""``deqrobust <command>``: train, evaluate, demo, reproduce."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .. import __version__
from ..utils.malloc import reexec_with_malloc_tuning

SUBCOMMANDS = ("train", "evaluate", "demo", "reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqrobust",
        description="Train adversarially robust deep equilibrium models and evaluate them fully white-box.",
    )
    parser.add_argument("--version", action="version", version=f"deqrobust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"deqrobust.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet
            if exc.name != f"deqrobust.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("-h", "--help", "--version"):
        reexec_with_malloc_tuning(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the raw arguments, for subcommands that relaunch themselves (evaluate --workers)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
