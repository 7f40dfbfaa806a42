"""``cleandift analyze``: timestep sweeps and the noise-variance decomposition.

Examples::

    # depth RMSE of noisy features at several t, against the student and the naive-clean baseline
    cleandift analyze sweep --task depth --root data/nyu --model sd21 \\
        --checkpoint cleandift_sd21_unet.safetensors --ts 0,100,200,300,500,700 --out runs/sweep_depth

    # how much of us6 is noise? (paper Fig. 3)
    cleandift analyze variance --images photos/ --model sd21 --taps us6,us9 --ts 0:1000:100 --out runs/variance

Timesteps (``--ts``) are a comma list whose items may be ranges ``start:stop[:step]`` (stop
excluded, as in Python), e.g. ``0,50,100:1000:100``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import ConfigError, DatasetError
from .common import add_model_args, resolve_device
from .eval_probes import TASK_DEFAULTS, add_feature_args, add_train_args, feature_spec, load_model, train_config

logger = logging.getLogger(__name__)

DEFAULT_SWEEP_TS = "0,50,100,200,300,400,500,700,900"
DEFAULT_VARIANCE_TS = "0,50,100:1000:100,999"


def parse_timesteps(text: str) -> list[int]:
    """``"0,50,100:1000:100"`` -> sorted unique ints, each checked to lie in ``[0, 999]``."""
    from ..timesteps import validate_timestep  # noqa: PLC0415 - imports torch; keep `--help` fast

    values: list[int] = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        try:
            if ":" in item:
                parts = [int(p) for p in item.split(":")]
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0):
                    raise ValueError
                values.extend(range(*parts))
            else:
                values.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad timestep item {item!r} in {text!r}; use e.g. 0,50,100:1000:100")
    if not values:
        raise argparse.ArgumentTypeError(f"no timesteps in {text!r}")
    for t in values:
        try:
            validate_timestep(t)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return sorted(set(values))


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("analyze", help="timestep sweeps and the noise-variance decomposition",
                                   description="Analyses of diffusion features (paper §3.1 and the t sweeps).")
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS")
    _register_sweep(sub)
    _register_variance(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])
    return parser


def _register_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="probe score vs timestep: noisy, clean (student) and naive-clean features",
                       description="Evaluate a probe task on noisy features at every --ts, on the student "
                                   "(--checkpoint) and on the frozen model fed clean images at each t.")
    p.add_argument("--task", required=True, choices=sorted(TASK_DEFAULTS), help="probe task")
    p.add_argument("--root", required=True, help="dataset folder of the task")
    p.add_argument("--ts", type=parse_timesteps, default=DEFAULT_SWEEP_TS,
                   help=f"timesteps (default {DEFAULT_SWEEP_TS})")
    p.add_argument("--ensemble", type=int, default=1, help="noise draws per noisy feature (default 1)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive-clean baseline")
    p.add_argument("--out", required=True, help="output folder (sweep.json, sweep.csv, sweep.png)")
    add_model_args(p)
    add_feature_args(p, None)  # prompt / split defaults depend on --task, filled in at run time
    add_train_args(p, save_flag=False)  # one probe per sweep point: weights are not kept
    p.add_argument("--k", type=int, default=10, help="kNN neighbours (task knn)")
    p.add_argument("--eval-crop", default="none", choices=("none", "eigen"), help="depth evaluation crop")
    p.set_defaults(func=run_sweep)


def _register_variance(sub) -> None:
    p = sub.add_parser("variance", help="fraction of feature variance explained by noise / clean image vs t",
                       description="Paper §3.1: fit feat(x_t;t) by a*feat(eps;999), the residual by b*feat(x0;0); "
                                   "report the explained fractions per tap and t.")
    p.add_argument("--images", required=True, help="image folder / file / glob")
    p.add_argument("--taps", default=None,
                   help="tap(s), comma-separated (default: the family's feature tap, us6 for SD)")
    p.add_argument("--ts", type=parse_timesteps, default=DEFAULT_VARIANCE_TS,
                   help=f"timesteps (default {DEFAULT_VARIANCE_TS})")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's resolution)")
    p.add_argument("--resize", default="crop", choices=("stretch", "pad", "crop"), help="default crop")
    p.add_argument("--prompt", default="", help="prompt for every image (default empty)")
    p.add_argument("--max-images", type=int, default=16, help="use at most this many images (default 16)")
    p.add_argument("--batch-size", type=int, default=4, help="images per U-Net call (default 4)")
    p.add_argument("--draws", type=int, default=1, help="noise draws per image (default 1)")
    p.add_argument("--center", default="channel", choices=("channel", "global", "none"),
                   help="feature centring before the fit (default: per channel)")
    p.add_argument("--unet", default="base", choices=("base", "student"),
                   help="analyse the frozen model (default) or the --checkpoint student")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder (variance.json, variance.csv, variance.png)")
    add_model_args(p)
    p.set_defaults(func=run_variance)


# ---------------------------------------------------------------------------------------------- commands
def run_sweep(args: argparse.Namespace) -> int:
    from ..analysis.sweep import make_task_scorer, timestep_sweep  # noqa: PLC0415

    d = TASK_DEFAULTS[args.task]
    args.prompt = d["prompt"] if args.prompt is None else args.prompt
    args.split = args.split or d["split"]
    scorer = make_task_scorer(args.task, args.root, train_split=args.train_split, eval_split=args.split,
                              spec=feature_spec(args), train=train_config(args), task_config=_task_config(args),
                              cache_dir=args.cache_dir, device=resolve_device(args.device),
                              progress=not args.no_progress)  # opens the datasets: fails before the model loads
    backbone, student, t_student = load_model(args)
    result = timestep_sweep(scorer, backbone, args.ts, student=student, student_timestep=t_student,
                            ensemble=args.ensemble, naive_clean=not args.no_naive, taps=args.taps,
                            progress=not args.no_progress)
    result.config.update({"task": args.task, "root": args.root, "model": args.model, "checkpoint": args.checkpoint,
                          "taps": args.taps, "details": scorer.details})
    out = Path(args.out)
    result.save_json(out / "sweep.json")
    result.save_csv(out / "sweep.csv")
    result.plot(out / "sweep.png", title=f"{args.task}: {args.model} {args.taps}")
    best = result.best("noisy")
    clean = result.by_method("clean")
    logger.info("best noisy: t=%s %s=%.4f%s", best.t if best else None, result.metric,
                best.score if best else float("nan"),
                f"; clean: {clean[0].score:.4f}" if clean else "")
    logger.info("wrote %s", out)
    return 0


def _task_config(args: argparse.Namespace):
    if args.task == "depth":
        from ..eval.depth import DepthProbeConfig  # noqa: PLC0415

        return DepthProbeConfig(eval_crop=args.eval_crop)
    if args.task == "knn":
        from ..eval.knn import KNNConfig  # noqa: PLC0415

        return KNNConfig(k=args.k)
    return None


def run_variance(args: argparse.Namespace) -> int:
    from ..analysis.variance import noise_variance_analysis  # noqa: PLC0415
    from ..images import find_images, load_image, prepare_images  # noqa: PLC0415

    paths = find_images(args.images)[: args.max_images]
    if not paths:
        raise DatasetError(f"{args.images}: no images found")
    backbone, student, _ = load_model(args)
    if args.unet == "student" and student is None:
        raise ConfigError("--unet student needs --checkpoint (the student's weights)")
    size = args.size or backbone.resolution
    images, _ = prepare_images([load_image(p) for p in paths], size, args.resize)
    result = noise_variance_analysis(backbone, images.to(backbone.device), args.ts, taps=args.taps,
                                     prompts=args.prompt or None,
                                     unet=student if args.unet == "student" else None, batch_size=args.batch_size,
                                     draws=args.draws, center=args.center, seed=args.seed,
                                     progress=not args.no_progress)
    result.config.update({"images": [str(p) for p in paths], "size": size, "resize": args.resize,
                          "model": args.model, "checkpoint": args.checkpoint, "unet": args.unet})
    out = Path(args.out)
    result.save_json(out / "variance.json")
    result.save_csv(out / "variance.csv")
    result.plot(out / "variance.png", title=f"{args.model} ({args.unet})")
    for tap in result.taps():
        s = result.series(tap)
        i = min(range(len(s["t"])), key=lambda k: abs(s["t"][k] - 261))
        logger.info("%s t=%d: eps %.2f, x0 %.2f, remaining %.2f", tap, s["t"][i], s["eps"][i], s["x0"][i],
                    s["remaining"][i])
    logger.info("wrote %s", out)
    return 0
