"""``cleandift`` entry point.

Each subcommand lives in its own module ``cleandift.cli.<name>`` exposing
``register(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func`` (called with the parsed
args, returning an exit code). The module list below is the registry; a new command is one file plus
one entry here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from ..errors import CleanDIFTError
from ..version import __version__

COMMAND_MODULES = ("demo", "extract", "train", "pretrain", "eval", "analyze", "viz", "convert", "env")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cleandift",
        description="Clean, noise-free diffusion features: extract, distill, evaluate (CleanDIFT, CVPR 2025).",
    )
    parser.add_argument("--version", action="version", version=f"cleandift {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"{__package__}.{name}") is None:
            continue
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except CleanDIFTError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
