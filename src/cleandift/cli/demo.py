"""``cleandift demo``: the README's first command -- an offline end-to-end run on the built-in model."""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="offline end-to-end demo on the built-in model (the default job)",
                              description="Distil briefly, extract features four ways, score them (kNN, warp PCK; "
                                          "each method's tap picked on validation images, scored on test images), "
                                          "time them (median after a warm-up) and write an HTML report. Running it "
                                          "again in the same --out replaces the previous demo's results.")
    p.add_argument("--out", default="cleandift-demo",
                   help="output folder (default ./cleandift-demo); a rerun replaces the demo's own outputs there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None,
                   help="pixel-space model folder (from `cleandift pretrain-mini --export`); default: the bundled mini")
    p.add_argument("--student", default=None,
                   help="CleanDIFT student export of that model; default: the bundled one, else the demo's own "
                        "short distillation")
    p.add_argument("--distill-steps", type=int, default=40, help="steps of the short distillation (default 40)")
    p.add_argument("--bank", type=int, default=1000,
                   help="kNN bank size, bundled training images (10-1900: 100 more are the validation images)")
    p.add_argument("--queries", type=int, default=300, help="held-out test images scored (max 500)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..demo import run_demo  # noqa: PLC0415

    run_demo(args.out, seed=args.seed, model=args.model, student=args.student, distill_steps=args.distill_steps,
             bank=args.bank, queries=args.queries)
    return 0
