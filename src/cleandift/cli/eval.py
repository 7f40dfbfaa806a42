"""``cleandift eval``: benchmark features. ``spair`` / ``pfpascal`` = semantic correspondence (PCK).

Settings come from a named protocol preset (``--preset``; default ``dift-spair`` for noisy and
``cleandift-spair`` for clean extraction), then explicit flags. The resolved settings are printed,
saved in the results JSON, and every departure from the preset is logged (DIFT #24).

Probe tasks (``depth``, ``seg``, ``knn``) are added by ``cleandift.cli.eval_probes`` when present.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging

from .common import add_model_args

log = logging.getLogger(__name__)

CORRESPONDENCE_TASKS = {
    "spair": "SPair-71k (official layout: JPEGImages/, ImageAnnotation/, PairAnnotation/{trn,val,test}/)",
    "pfpascal": "PF-Pascal (JPEGImages/ + {test,val}_pairs_pf_pascal.csv)",
}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="evaluate features: semantic correspondence (spair, pfpascal) and probes",
        description="Evaluate features on benchmarks. Correspondence tasks report PCK per keypoint and per "
                    "image, for target-bbox and image-size thresholds.")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    for name, help_text in CORRESPONDENCE_TASKS.items():
        sp = tasks.add_parser(name, help=f"PCK on {help_text}",
                              description=f"Semantic correspondence on {help_text}.")
        add_correspondence_args(sp)
        sp.set_defaults(func=run_correspondence_cmd, dataset=name)
    if importlib.util.find_spec(f"{__package__}.eval_probes") is not None:
        importlib.import_module(f"{__package__}.eval_probes").add_probe_commands(tasks)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    return p


def add_correspondence_args(p: argparse.ArgumentParser) -> None:
    from ..eval.presets import DESCRIPTORS, PRESETS  # noqa: PLC0415

    p.add_argument("--root", required=True, metavar="DATASET_DIR",
                   help="dataset folder: SPair-71k (JPEGImages/, ImageAnnotation/, PairAnnotation/) or PF-Pascal "
                        "(JPEGImages/ + the pair CSVs)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="protocol preset (default: dift-spair; cleandift-spair with --mode clean or "
                        "--checkpoint)")
    add_model_args(p)
    p.set_defaults(model=None, dtype=None)  # None = take the preset's value
    p.add_argument("--descriptor", choices=DESCRIPTORS, default=None,
                   help="diffusion (DIFT / CleanDIFT), dinov2, sd-dino or tlfr (fusions); default: the "
                        "preset's")
    p.add_argument("--dino", default=None,
                   help="fusions: DINOv2 folder or hub id (default facebook/dinov2-base)")
    p.add_argument("--fusion", action="append", default=[], metavar="KEY=VALUE",
                   help="fusion setting on top of the preset's (value parsed as JSON when possible), e.g. "
                        "flip_permutations=flip.json or adaptive_flip=false; repeatable")
    p.add_argument("--mode", choices=("clean", "noisy"), default=None,
                   help="clean: CleanDIFT student on the clean image; noisy: DIFT (noise + ensemble)")
    p.add_argument("--t", type=float, default=None,
                   help="noisy: noise timestep (DIFT 261); clean: the student's timestep input (261)")
    p.add_argument("--ensemble", type=int, default=None, help="noisy: noise draws averaged (DIFT 8)")
    p.add_argument("--taps", default=None,
                   help="comma-separated taps, concatenated after per-tap L2 norm (DIFT: us6)")
    p.add_argument("--size", type=int, default=None, help="descriptor input size in px (DIFT 768)")
    p.add_argument("--resize", choices=("stretch", "pad", "crop"), default=None,
                   help="how images enter the input frame (DIFT: stretch)")
    p.add_argument("--prompt", default=None, help="prompt template, {category} is replaced ('' = no prompt)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (combined with each image's content)")
    p.add_argument("--method", choices=("argmax", "soft-argmax"), default=None,
                   help="match: argmax, or TLFR's window soft-argmax")
    p.add_argument("--grid", choices=("pixels", "cells"), default=None,
                   help="target candidates: every original pixel (DIFT) or feature-cell centres "
                        "(SD-DINO/TLFR)")
    p.add_argument("--comparison", choices=("<=", "<"), default=None, help="PCK test: <= (DIFT) or < (TLFR)")
    p.add_argument("--alphas", default=None, help="comma-separated PCK alphas (default 0.01,0.05,0.1,0.15)")
    p.add_argument("--split", default="test",
                   help="split: test (default), val, trn; for PF-Pascal also a CSV path")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N pairs per category (the first N; for quick runs)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="max U-Net samples per forward (bounds memory)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="per-image feature cache; a rerun or an interrupted run resumes from it "
                        "(default: a temporary folder)")
    p.add_argument("--out", default=None, metavar="RESULTS.json",
                   help="results JSON (default: cleandift_eval_<dataset>_<split>.json)")
    p.add_argument("--label", default=None,
                   help="name of this run, stored in the results; `viz curves` draws one curve per label "
                        "(default: the preset, with the settings that differ when runs are compared)")


def settings_from_args(args):
    """Resolve CLI flags against the preset into :class:`~cleandift.eval.presets.CorrespondenceSettings`."""
    from ..eval.presets import PRESETS, resolve_settings  # noqa: PLC0415

    preset = args.preset
    if preset is None:
        clean = args.mode == "clean" or (args.mode is None and args.checkpoint)
        preset = "cleandift-spair" if clean else "dift-spair"
    mode = args.mode or PRESETS[preset].get("mode", "noisy")
    overrides = dict(
        dataset=args.dataset, model=args.model, checkpoint=args.checkpoint, mode=args.mode,
        ensemble=args.ensemble, taps=args.taps, size=args.size, resize=args.resize, prompt=args.prompt,
        seed=args.seed, method=args.method, grid=args.grid, comparison=args.comparison, alphas=args.alphas,
        split=args.split, categories=args.categories, limit=args.limit, device=args.device, dtype=args.dtype,
        chunk_size=args.chunk_size, descriptor=args.descriptor,
    )
    fusion = parse_fusion(args.fusion)
    if args.dino:
        fusion["dinov2"] = args.dino
    if fusion:
        overrides["fusion"] = {**PRESETS[preset].get("fusion", {}), **fusion}
    if args.t is not None:
        overrides["t" if mode == "noisy" else "clean_timestep"] = int(args.t) if mode == "noisy" else args.t
    return resolve_settings(preset, **overrides)


def parse_fusion(items: list[str]) -> dict:
    """``["key=value", ...]`` -> dict; values are JSON when they parse (``false``, ``256``), else strings."""
    import json  # noqa: PLC0415

    from ..errors import ConfigError  # noqa: PLC0415

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--fusion expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def run_correspondence_cmd(args) -> int:
    import json  # noqa: PLC0415

    from ..eval.correspondence import run_correspondence  # noqa: PLC0415
    from ..eval.presets import preset_differences  # noqa: PLC0415

    settings = settings_from_args(args)
    for key, (mine, theirs) in preset_differences(settings).items():
        log.warning("differs from preset %s: %s=%s (preset: %s)", settings.preset, key, mine, theirs)
    log.info("settings: %s", json.dumps(settings.as_dict(), sort_keys=True))
    out = args.out or f"cleandift_eval_{settings.dataset}_{settings.split.replace('/', '_')}.json"
    load_kwargs = {"single_file_config": args.single_file_config} if args.single_file_config else None
    result = run_correspondence(settings, args.root, out=out, cache_dir=args.cache, load_kwargs=load_kwargs,
                                label=args.label)
    print(result.table())
    print(f"\nwrote {out}")
    return 0
