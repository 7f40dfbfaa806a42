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

COMMAND_MODULES = ("demo", "extract", "train", "pretrain", "eval", "analyze", "viz", "convert", "env", "explore")


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


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (tests and ``redirect_stderr`` swap it between calls)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    """Our messages at INFO on stderr; other libraries keep their own handlers and levels.

    Configuring the root logger instead would print every message of a library that has its own
    handler twice (huggingface_hub's "Retrying in 1s" lines did) and surface their INFO chatter.
    ``-v`` turns on DEBUG for everything.
    """
    ours = logging.getLogger("cleandift")
    if not any(isinstance(h, _StderrHandler) for h in ours.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = not verbose  # with -v the root handler below prints everything else, ours once
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
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
