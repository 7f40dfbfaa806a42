"""``cleandift viz``: PNG figures of features, matches, similarity heatmaps and PCK curves.

Subcommands::

    cleandift viz pca IMAGE... --out DIR            # PCA -> RGB of the features
    cleandift viz match SRC TRG --points "x,y;x,y" --out FILE.png [--gt "x,y;..."]
    cleandift viz heatmap SRC TRG --point x,y --out FILE.png
    cleandift viz curves RESULTS.json... --out FILE.png

Features are SD taps (``--features sd``, clean or noisy), DINOv2 (``dinov2``) or a fusion
(``sd-dino``, ``tlfr``). Points are ``x,y`` in pixels of the original image (pixel
centres at integers); they are mapped into the model frame and back exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..constants import RESIZE_POLICIES
from .common import add_model_args, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

FEATURES = ("sd", "dinov2", "sd-dino", "tlfr")
DEFAULT_METRIC = "pck@0.10/bbox/per-point"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "viz", help="figures: PCA of features, matches, similarity heatmaps, PCK curves (PNG)",
        description="Write PNG figures. Every subcommand prints the path(s) it wrote.")
    sub = p.add_subparsers(dest="viz_command", metavar="FIGURE")
    _pca_parser(sub)
    _match_parser(sub)
    _heatmap_parser(sub)
    _curves_parser(sub)
    p.set_defaults(func=lambda args: _help(p))
    return p


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 1


# ---------------------------------------------------------------------------------------------- arguments
def _add_feature_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    g = p.add_argument_group("features")
    g.add_argument("--features", choices=FEATURES, default="sd",
                   help="sd: diffusion taps; dinov2; sd-dino / tlfr: SD fused with DINOv2 (default sd)")
    g.add_argument("--mode", choices=("clean", "noisy"), default="clean",
                   help="clean: one pass of the student (--checkpoint) on the clean image; noisy: DIFT")
    g.add_argument("--t", type=float, default=None,
                   help="noisy: noise timestep (default 261); clean: the student's timestep input "
                        "(default: the checkpoint's learned value, else 261)")
    g.add_argument("--ensemble", type=int, default=8, help="noisy: noise draws averaged (default 8)")
    g.add_argument("--noise", choices=("independent", "shared"), default="independent")
    g.add_argument("--tap", "--taps", dest="taps", default=None,
                   help="comma-separated taps (default: us6 for sd, us8,us5,us2 for fusions)")
    g.add_argument("--size", type=int, default=None,
                   help="input frame in px (default: model resolution for sd, 840 for dinov2, "
                        "max(--sd-size, --dino-size) for fusions)")
    g.add_argument("--resize", choices=RESIZE_POLICIES, default=None,
                   help="how images enter the frame (default: stretch for sd, pad otherwise)")
    g.add_argument("--prompt", default="", help="text prompt for every image (default: empty)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (noisy mode)")
    g.add_argument("--chunk-size", type=int, default=8, help="max U-Net samples per forward")
    g.add_argument("--dino", default=None, help="DINOv2 folder or hub id (default facebook/dinov2-base)")
    g.add_argument("--dino-size", type=int, default=840, help="DINOv2 input side (default 840 -> 60x60)")
    g.add_argument("--dino-layer", type=int, default=11, help="DINOv2 block, 0-based (default 11)")
    g.add_argument("--sd-size", type=int, default=960, help="fusions: SD input side (default 960)")


def _add_match_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("matching (default: the protocol of the chosen features)")
    g.add_argument("--method", choices=("argmax", "soft-argmax"), default=None)
    g.add_argument("--grid", choices=("pixels", "cells"), default=None)
    g.add_argument("--source", choices=("bilinear", "cell"), default=None)


def _pca_parser(sub) -> None:
    p = sub.add_parser("pca", help="PCA -> RGB of each image's features (first component = foreground mask)",
                       description="Fit one PCA on the features of all given images, threshold the first "
                                   "component for the foreground and show the next three as RGB (CleanDIFT Fig. 16, "
                                   "DINOv2 Fig. 1).")
    p.add_argument("images", nargs="+", help="image files, folders or globs")
    _add_feature_args(p)
    p.add_argument("--out", required=True, help="output folder (one <stem>_pca.png per image)")
    p.add_argument("--fg-threshold", type=float, default=0.0,
                   help="foreground = first component > this, in its std units (default 0)")
    p.add_argument("--no-fg", action="store_true", help="no foreground split: components 1-3 as RGB")
    p.add_argument("--orient", choices=("border", "minority", "none"), default="border",
                   help="sign of the first component: border cells are background (default)")
    p.add_argument("--refit", action="store_true", help="second PCA on the foreground (DINOv2 Fig. 1 variant)")
    p.add_argument("--separate", action="store_true", help="one PCA per image instead of one shared PCA")
    p.add_argument("--out-size", type=int, default=None,
                   help="longer side of the PNGs in px (default: the frame size), original aspect")
    p.set_defaults(func=run_pca)


def _match_parser(sub) -> None:
    p = sub.add_parser("match", help="match points from SRC into TRG and draw them",
                       description="Predict where SRC points land in TRG; with --gt, lines are green if "
                                   "correct at PCK threshold alpha * max(bbox or image side), else red.")
    p.add_argument("src", help="source image")
    p.add_argument("trg", help="target image")
    p.add_argument("--points", required=True, help='source points "x,y;x,y;..." (original SRC pixels)')
    p.add_argument("--gt", default=None, help='true target points "x,y;..." (same order)')
    p.add_argument("--alpha", type=float, default=0.1, help="PCK alpha (default 0.1)")
    p.add_argument("--bbox", default=None, help="target box x1,y1,x2,y2 for the threshold (default: image)")
    p.add_argument("--comparison", choices=("<=", "<"), default="<=", help="PCK boundary (DIFT <=, TLFR <)")
    _add_feature_args(p)
    _add_match_args(p)
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=run_match)


def _heatmap_parser(sub) -> None:
    p = sub.add_parser("heatmap", help="similarity of one SRC point to every TRG location, overlaid on TRG")
    p.add_argument("src", help="source image")
    p.add_argument("trg", help="target image")
    p.add_argument("--point", required=True, help="query x,y in SRC pixels")
    p.add_argument("--gt", default=None, help="true x,y in TRG (drawn as a cross)")
    _add_feature_args(p)
    _add_match_args(p)
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=run_heatmap)


def _curves_parser(sub) -> None:
    p = sub.add_parser("curves", help="PCK (or any score) vs timestep from result / sweep JSONs",
                       description="`cleandift eval` results: noisy runs of one preset (or one `eval --label`) "
                                   "form a curve over t, t-independent ones (clean) become horizontal lines. Runs "
                                   "whose settings differ are never merged: each gets its own curve, labelled by "
                                   "what differs (e.g. ensemble=1 vs ensemble=8), or by file name when two files "
                                   "give the same point. Timestep sweeps (`cleandift analyze sweep`) and "
                                   "{\"curves\": {name: {\"t\": [...], \"pck\": [...]}}, \"constants\": "
                                   "{name: value}} files are read too.")
    p.add_argument("results", nargs="+", help="result, sweep or curves JSON files")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"result key to plot (default {DEFAULT_METRIC})")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=run_curves)


# ---------------------------------------------------------------------------------------------- descriptors
def build_descriptor(args, co_pca: bool = True):
    """The dense descriptor the feature arguments describe (see :mod:`cleandift.eval.fusion`)."""
    from ..eval import fusion  # noqa: PLC0415
    from ..eval.dinov2 import DEFAULT_DINOV2  # noqa: PLC0415

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    dino = dict(dino_model=args.dino or DEFAULT_DINOV2, dino_size=args.dino_size, dino_layer=args.dino_layer,
                size=args.size, resize=args.resize or "pad", device=device, dtype=dtype)
    if args.features == "dinov2":
        return fusion.build_dinov2_descriptor(**dino)
    extractor = _extractor(args, device, dtype)
    if args.features == "sd":
        from ..eval.descriptors import DiffusionDescriptor  # noqa: PLC0415

        size = args.size or extractor.backbone.resolution
        return DiffusionDescriptor(extractor, taps=_taps(args, ("us6",)), size=size, resize=args.resize or "stretch",
                                   seed=args.seed)
    common = dict(extractor=extractor, taps=_taps(args, fusion.SD_DINO_TAPS), sd_size=args.sd_size, seed=args.seed,
                  **dino)
    if args.features == "sd-dino":
        return fusion.build_sd_dino_descriptor(co_pca=co_pca, **common)
    return fusion.build_tlfr_descriptor(**common)


def _taps(args, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t.strip() for t in args.taps.split(",") if t.strip()) if args.taps else default


def _extractor(args, device, dtype):
    from ..backbones import load_backbone  # noqa: PLC0415
    from .extract import build_extractor  # noqa: PLC0415

    backbone = load_backbone(args.model, device=device, dtype=dtype, single_file_config=args.single_file_config)
    ns = argparse.Namespace(**vars(args))
    ns.taps = None  # descriptors pass their taps explicitly
    return build_extractor(ns, backbone, owns_backbone=True)


def _describe_images(desc, paths: list[Path], prompt: str, batch_size: int = 4):
    """Load, frame and describe images: ``(features (B, C, h, w), PIL originals, transforms)``."""
    import torch  # noqa: PLC0415

    from ..images import image_to_tensor, load_image, resize_image  # noqa: PLC0415

    originals, frames, transforms = [], [], []
    for path in paths:
        img = load_image(path)
        framed, tf = resize_image(img, desc.size, desc.resize)
        originals.append(img)
        frames.append(image_to_tensor(framed))
        transforms.append(tf)
    batch = torch.stack(frames)
    feats = torch.cat([desc(batch[i:i + batch_size], prompt or None) for i in range(0, len(paths), batch_size)])
    return feats.float().cpu(), originals, transforms


def _pair_descriptors(desc, src, trg):
    fn = getattr(desc, "pair_descriptors", None)
    return fn(src, trg) if fn else (src, trg)


def _match_settings(args, desc) -> dict:
    from ..eval.fusion import MatchSettings  # noqa: PLC0415

    base = getattr(desc, "match", None) or MatchSettings("argmax", "pixels", "bilinear")  # DIFT for plain SD
    chosen = {k: getattr(args, k) for k in ("method", "grid", "source") if getattr(args, k) is not None}
    return {**base.as_dict(), **chosen}


def parse_points(text: str, what: str = "--points"):
    """``"x,y;x,y"`` -> ``(N, 2)`` float tensor."""
    import torch  # noqa: PLC0415

    from ..errors import ConfigError  # noqa: PLC0415

    try:
        rows = [[float(v) for v in item.split(",")] for item in text.replace(" ", "").split(";") if item]
    except ValueError as exc:
        raise ConfigError(f"{what}: expected 'x,y;x,y;...', got {text!r}") from exc
    if not rows or any(len(r) != 2 for r in rows):
        raise ConfigError(f"{what}: expected 'x,y;x,y;...', got {text!r}")
    return torch.tensor(rows, dtype=torch.float32)


def _size_hw(img) -> tuple[int, int]:
    return img.height, img.width


# ---------------------------------------------------------------------------------------------- pca
def run_pca(args) -> int:
    from ..images import find_images  # noqa: PLC0415
    from ..viz.pca import pca_rgb, save_rgb_png  # noqa: PLC0415

    paths = find_images(args.images)
    if not paths:
        log.error("no images found in %s", " ".join(args.images))
        return 2
    desc = build_descriptor(args, co_pca=False)  # PCA needs per-image features: no pair-wise co-PCA
    feats, _, transforms = _describe_images(desc, paths, args.prompt)
    threshold = None if args.no_fg else args.fg_threshold
    kwargs = dict(orient=args.orient, refit_foreground=args.refit)
    if args.separate:
        colours = [pca_rgb(f, threshold, **kwargs).rgb for f in feats]
    else:
        colours = list(pca_rgb(feats, threshold, **kwargs).rgb)
    out = Path(args.out)
    for name, rgb, tf in zip(_output_names(paths), colours, transforms):
        side = args.out_size or max(tf.out_w, tf.out_h)
        print(save_rgb_png(map_to_original(rgb, tf, side), out / f"{name}_pca.png"))
    return 0


def _output_names(paths: list[Path]) -> list[str]:
    """File stems, prefixed by the parent folder where two images share a stem (no overwrites)."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}__{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def map_to_original(rgb, tf, long_side: int):
    """Cells of an ``(h, w, 3)`` map over the model frame, resampled (nearest) onto the original image
    scaled to ``long_side`` -- exact for every resize policy (padding dropped, crops respected)."""
    import torch  # noqa: PLC0415

    h, w = rgb.shape[:2]
    scale = long_side / max(tf.orig_w, tf.orig_h)
    out_w, out_h = max(1, round(tf.orig_w * scale)), max(1, round(tf.orig_h * scale))
    xs = (torch.arange(out_w, dtype=torch.float32) + 0.5) * tf.orig_w / out_w - 0.5
    ys = (torch.arange(out_h, dtype=torch.float32) + 0.5) * tf.orig_h / out_h - 0.5
    fx = tf.to_model(torch.stack([xs, torch.zeros_like(xs)], -1))[:, 0]
    fy = tf.to_model(torch.stack([torch.zeros_like(ys), ys], -1))[:, 1]
    col = torch.floor((fx + 0.5) * w / tf.out_w).long().clamp(0, w - 1)
    row = torch.floor((fy + 0.5) * h / tf.out_h).long().clamp(0, h - 1)
    return rgb[row][:, col]


# ---------------------------------------------------------------------------------------------- match / heatmap
def _pair(args):
    """Describe SRC and TRG; return the compared descriptors, originals, transforms and match settings."""
    desc = build_descriptor(args)
    feats, (src_img, trg_img), (src_tf, trg_tf) = _describe_images(desc, [Path(args.src), Path(args.trg)], args.prompt)
    src, trg = _pair_descriptors(desc, feats[0], feats[1])
    return src, trg, src_img, trg_img, src_tf, trg_tf, _match_settings(args, desc)


def run_match(args) -> int:
    from ..errors import ConfigError  # noqa: PLC0415
    from ..eval.matching import match_points  # noqa: PLC0415
    from ..viz.correspondence import correct_mask, draw_matches  # noqa: PLC0415

    src_xy = parse_points(args.points)
    gt_xy = parse_points(args.gt, "--gt") if args.gt else None
    if gt_xy is not None and gt_xy.shape != src_xy.shape:
        raise ConfigError(f"--gt has {len(gt_xy)} points but --points has {len(src_xy)}")
    src, trg, src_img, trg_img, src_tf, trg_tf, settings = _pair(args)
    pred = match_points(src, trg, src_xy, _size_hw(src_img), _size_hw(trg_img), src_transform=src_tf,
                        trg_transform=trg_tf, **settings)
    threshold = _threshold(args, trg_img) if gt_xy is not None else None
    path = draw_matches(src_img, trg_img, src_xy, pred, args.out, gt_xy=gt_xy, threshold=threshold,
                        inclusive=args.comparison == "<=", title=f"{args.features} features")
    report = {"out": str(path), "pred": [[round(float(v), 2) for v in p] for p in pred]}
    if gt_xy is not None:
        ok = correct_mask(pred, gt_xy, threshold, args.comparison == "<=")
        report.update(threshold=round(threshold, 3), correct=[bool(c) for c in ok])
    print(json.dumps(report))
    return 0


def _threshold(args, trg_img) -> float:
    from ..errors import ConfigError  # noqa: PLC0415

    if args.bbox:
        try:
            x1, y1, x2, y2 = (float(v) for v in args.bbox.split(","))
        except ValueError as exc:
            raise ConfigError(f"--bbox: expected x1,y1,x2,y2, got {args.bbox!r}") from exc
        return args.alpha * max(x2 - x1, y2 - y1)
    return args.alpha * max(trg_img.width, trg_img.height)


def run_heatmap(args) -> int:
    import torch  # noqa: PLC0415

    from ..eval.matching import match_points  # noqa: PLC0415
    from ..features import sample_points  # noqa: PLC0415
    from ..viz.correspondence import draw_heatmap, similarity_map  # noqa: PLC0415

    point = parse_points(args.point, "--point")[:1]
    gt = parse_points(args.gt, "--gt")[:1] if args.gt else None
    src, trg, src_img, trg_img, src_tf, trg_tf, settings = _pair(args)
    sim = similarity_map(src, trg, src_tf.to_model(point)[0], (src_tf.out_h, src_tf.out_w))
    # resample the target-frame map at every original target pixel (exact for pad / crop / stretch)
    ys, xs = torch.meshgrid(torch.arange(trg_img.height, dtype=torch.float32),
                            torch.arange(trg_img.width, dtype=torch.float32), indexing="ij")
    frame_xy = trg_tf.to_model(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    heat = sample_points(sim[None, None], frame_xy, (trg_tf.out_h, trg_tf.out_w))[0, :, 0]
    heat = heat.view(trg_img.height, trg_img.width)
    pred = match_points(src, trg, point, _size_hw(src_img), _size_hw(trg_img), src_transform=src_tf,
                        trg_transform=trg_tf, **settings)
    path = draw_heatmap(src_img, trg_img, point[0], heat, args.out, pred_xy=pred[0], gt_xy=gt,
                        title=f"{args.features} features: similarity to ({point[0, 0]:.0f}, {point[0, 1]:.0f})")
    print(json.dumps({"out": str(path), "pred": [round(float(v), 2) for v in pred[0]]}))
    return 0


# ---------------------------------------------------------------------------------------------- curves
def run_curves(args) -> int:
    from ..viz.plots import plot_pck_curves  # noqa: PLC0415

    curves, constants, ylabel = read_curves([Path(p) for p in args.results], args.metric)
    path = plot_pck_curves(curves, args.out, constants=constants, ylabel=ylabel, title=args.title)
    print(path)
    return 0


#: Settings that never change a result's value: runs differing only in these are the same run.
_VOLATILE_SETTINGS = frozenset({"device", "chunk_size", "preset"})
#: Settings a mode ignores (noisy: the student's; clean: the noise's).
_UNUSED_BY_MODE = {"noisy": frozenset({"clean_timestep", "checkpoint"}),
                   "clean": frozenset({"t", "ensemble", "noise"})}


@dataclass
class _Point:
    """One plotted value: ``t is None`` for a horizontal line. ``run`` identifies the run's settings."""

    label: str
    t: float | None
    value: float
    source: Path
    run: dict | None = None


def read_curves(paths: list[Path], metric: str = DEFAULT_METRIC) -> tuple[dict, dict, str]:
    """``({label: (ts, values)}, {label: value}, y label)`` from result, sweep and curve files.

    Understood: ``cleandift eval`` results (``results`` + ``settings``: noisy runs with a ``t``
    form a curve per preset (or per ``label``, set with ``eval --label``), others are constants),
    timestep sweeps (``rows`` of ``method``, ``t``, ``score``; rows without ``t`` are constants) and
    ``{"curves": ..., "constants": ...}`` files.

    Runs are kept apart, never merged: results of one preset whose settings differ (other than ``t``)
    become separate curves labelled by what differs (e.g. ``dift-spair (ensemble=1)``), and two values
    that would still land on the same point get their file's name. A point that cannot be told apart
    even then (the same file holds it twice) is an error, not a silent overwrite.
    """
    from ..errors import ConfigError  # noqa: PLC0415

    points: list[_Point] = []
    ylabels: set[str] = set()
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable JSON file ({exc})") from exc
        prefix = f"{path.stem}: " if len(paths) > 1 else ""
        for record in data if isinstance(data, list) else [data]:
            ylabels.add(_read_record(record, path, metric, prefix, points))
    points = _separate_runs(points)
    curves: dict[str, dict[float, float]] = {}
    constants: dict[str, float] = {}
    for p in points:
        if p.t is None:
            constants[p.label] = p.value
        else:
            curves.setdefault(p.label, {})[p.t] = p.value
    if not curves and not constants:
        raise ConfigError("no plottable results in " + ", ".join(map(str, paths)))
    curves_out = {label: (sorted(v), [v[t] for t in sorted(v)]) for label, v in curves.items()}
    return curves_out, constants, ylabels.pop() if len(ylabels) == 1 else "score"


def _read_record(record: dict, path: Path, metric: str, prefix: str, points: list[_Point]) -> str:
    """Add one record's points; returns the name of what it measures."""
    from ..errors import ConfigError  # noqa: PLC0415

    if not isinstance(record, dict):
        raise ConfigError(f"{path}: expected JSON objects, got {type(record).__name__}")
    try:
        if "curves" in record or "constants" in record:
            for name, curve in (record.get("curves") or {}).items():
                values = curve.get("pck", curve.get("values"))
                if len(curve["t"]) != len(values):
                    raise ConfigError(f"{path}: curve {name!r} has {len(curve['t'])} timesteps but "
                                      f"{len(values)} values")
                points += [_Point(name, float(t), float(v), path) for t, v in zip(curve["t"], values)]
            points += [_Point(k, None, float(v), path) for k, v in (record.get("constants") or {}).items()]
            return metric
        if isinstance(record.get("rows"), list):  # a timestep sweep (cleandift.analysis.sweep)
            for row in record["rows"]:
                t = row.get("t")
                points.append(_Point(prefix + str(row.get("method", "score")), None if t is None else float(t),
                                     float(row["score"]), path))
            return str(record.get("metric", "score"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: malformed curves / sweep file ({type(exc).__name__}: {exc})") from exc
    results = record.get("results")
    if not isinstance(results, dict):
        raise ConfigError(f"{path}: not an evaluation result, a sweep or a curves file")
    if metric not in results:
        raise ConfigError(f"{path}: no result {metric!r}; available: {', '.join(sorted(results))}")
    if results[metric] is None:
        raise ConfigError(f"{path}: {metric!r} is undefined in this result (no keypoints counted)")
    settings = record.get("settings") or {}
    value = float(results[metric])
    if str((record.get("protocol") or {}).get("values", "")).startswith("percent"):
        log.info("%s: written by an older cleandift in percent; plotted as a fraction like newer results", path)
        value /= 100
    explicit = record.get("label")
    if explicit:
        label = explicit
    elif _method(record, settings) == "naive-clean":  # clean mode without a student: the baseline, by its name
        label = "naive-clean"
    else:
        label = settings.get("preset") or f"{settings.get('descriptor', 'features')}/{settings.get('mode', '?')}"
    mode = settings.get("mode")
    t = float(settings["t"]) if mode == "noisy" and settings.get("t") is not None else None
    ignored = _VOLATILE_SETTINGS | _UNUSED_BY_MODE.get(mode, frozenset()) | {"t"}
    run = None if explicit else {k: v for k, v in settings.items() if k not in ignored}
    points.append(_Point(str(label), t, value, path, run))
    return metric


def _method(record: dict, settings: dict) -> str | None:
    """The result's method (``noisy`` | ``clean`` | ``naive-clean``); derived for files that predate the key."""
    from ..eval.presets import feature_method  # noqa: PLC0415

    if record.get("method"):
        return str(record["method"])
    if "mode" not in settings or "checkpoint" not in settings:
        return None
    return feature_method(settings["mode"], settings["checkpoint"], settings.get("descriptor", "diffusion"))


def _separate_runs(points: list[_Point]) -> list[_Point]:
    """Relabel so that each run is its own curve / line and no two values share a point."""
    from ..errors import ConfigError  # noqa: PLC0415

    for label in dict.fromkeys(p.label for p in points):
        group = [p for p in points if p.label == label]
        runs = [json.dumps(p.run, sort_keys=True, default=str) for p in group]
        if len(set(runs)) > 1:
            differing = _differing_settings([p.run or {} for p in group])
            log.warning("%r: %d runs with different settings (%s) are drawn separately", label, len(set(runs)),
                        ", ".join(differing))
            for p in group:
                p.label = f"{label} ({', '.join(f'{k}={_short(p.run.get(k) if p.run else None)}' for k in differing)})"
    for label in dict.fromkeys(p.label for p in points):
        group = [p for p in points if p.label == label]
        if _has_duplicates(group) and len({p.source for p in group}) > 1:
            log.warning("%r: more than one value at the same t in %s; one curve per file", label,
                        ", ".join(dict.fromkeys(str(p.source) for p in group)))
            for p in group:
                p.label = f"{label} [{p.source.stem}]"
    for label in dict.fromkeys(p.label for p in points):
        group = [p for p in points if p.label == label]
        if _has_duplicates(group):
            first = next(p for p in group if sum(q.t == p.t for q in group) > 1)
            where = "as a constant" if first.t is None else f"at t={first.t:g}"
            raise ConfigError(f"{first.source}: two values for {label!r} {where} that nothing tells apart; "
                              "give the runs distinct labels (`cleandift eval --label NAME`) or split the file")
    return points


def _has_duplicates(group: list[_Point]) -> bool:
    ts = [p.t for p in group]
    return len(ts) != len(set(ts))


def _differing_settings(runs: list[dict]) -> list[str]:
    keys = dict.fromkeys(k for run in runs for k in run)
    return [k for k in keys if len({json.dumps(run.get(k), sort_keys=True, default=str) for run in runs}) > 1]


def _short(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
