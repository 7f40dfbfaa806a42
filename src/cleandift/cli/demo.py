"""``cleandift demo``: the README's first command -- an offline end-to-end run on the built-in model."""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="offline end-to-end demo on the built-in model (the default job)")
    p.add_argument("--out", default="cleandift-demo", help="output folder (default ./cleandift-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..demo import run_demo  # noqa: PLC0415

    run_demo(args.out, seed=args.seed)
    return 0
