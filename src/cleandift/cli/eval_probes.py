"""``cleandift eval depth|seg|knn``: linear probes and kNN on clean or noisy features.

``cli/eval.py`` owns the ``eval`` command and calls :func:`add_probe_commands` with its task
subparsers. Examples::

    cleandift eval depth --root data/nyu --model sd21 --checkpoint cleandift_sd21_unet.safetensors --out depth.json
    cleandift eval depth --root data/nyu --model sd21 --mode noisy --t 299 --out depth_t299.json
    cleandift eval seg   --root data/VOCdevkit --model sd21 --mode noisy --t 100 --cache-dir cache/
    cleandift eval knn   --root data/imagenet --model sd15 --checkpoint cleandift_sd15_unet.safetensors --taps mid

Modes: ``clean`` -- the student (``--checkpoint``) on the clean image, one pass; ``noisy`` -- DIFT
features at ``--t`` averaged over ``--ensemble`` draws; ``naive-clean`` (alias ``naive``) -- the frozen
model on the clean image told timestep ``--t`` (the paper's "naive clean" baseline). ``clean`` without
a checkpoint *is* that baseline: it is warned about and recorded as ``naive-clean``.

Result files: ``mode`` is the method that produced the features (``clean`` = a CleanDIFT student,
``noisy``, ``naive-clean``); rates (``top1``, ``miou``, ``pixel_accuracy``, ``delta1``) are fractions in
[0, 1] like every rate cleandift writes (``rmse`` in metres, ``abs_rel`` a ratio).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..constants import READOUTS
from .common import add_model_args, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

#: Per task: default evaluation split, noisy timestep (paper's best SD2.1 t for depth / seg), prompt.
TASK_DEFAULTS = {
    "depth": {"split": "test", "t": 299, "prompt": "A photo of a room"},
    "seg": {"split": "val", "t": 100, "prompt": ""},
    "knn": {"split": "val", "t": 261, "prompt": ""},
}


def add_probe_commands(task_subparsers) -> None:
    """Add ``depth``, ``seg`` and ``knn`` to the ``cleandift eval`` task subparsers."""
    depth = task_subparsers.add_parser("depth", help="NYUv2 depth linear probe (RMSE, AbsRel, delta1)",
                                       description="Train a 256-bin linear depth probe on features of the train split "
                                                   "and evaluate it (NYUv2 .mat or rgb/ + depth/ folders).")
    _add_common(depth, "depth")
    add_train_args(depth)
    depth.add_argument("--splits-file", default=None, help="NYUv2 splits.mat (default: next to the .mat)")
    depth.add_argument("--eval-crop", default="none", choices=("none", "eigen"), help="evaluation crop (default none)")
    depth.set_defaults(func=run_depth_command)

    seg = task_subparsers.add_parser("seg", help="PASCAL VOC 2012 linear segmentation probe (mIoU)",
                                     description="Train a 1x1-conv segmentation probe on VOC train and report mIoU.")
    _add_common(seg, "seg")
    add_train_args(seg)
    seg.set_defaults(func=run_seg_command)

    knn = task_subparsers.add_parser("knn", help="kNN classification on pooled features (top-1)",
                                     description="k-nearest-neighbour classification (cosine) of average-pooled "
                                                 "features on an ImageFolder tree (root/train, root/val).")
    _add_common(knn, "knn")
    knn.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
    knn.add_argument("--weighting", default="majority", choices=("majority", "temperature"),
                     help="majority vote or DINO's exp(sim/T) weighting (default majority)")
    knn.add_argument("--temperature", type=float, default=0.07, help="T of temperature weighting (default 0.07)")
    knn.add_argument("--readout", default="avg", choices=READOUTS,
                     help="how a tap map becomes a vector: global avg (the protocol's default), max, avg+max, "
                          "avg+std, or a 2x2 / 4x4 grid (keeps coarse layout, so not global pooling)")
    knn.set_defaults(func=run_knn_command)


def add_feature_args(parser: argparse.ArgumentParser, task: str | None) -> None:
    """Feature flags shared by ``eval`` probes and ``analyze sweep`` (``task=None``: per-task defaults at run time)."""
    d = TASK_DEFAULTS.get(task, {"prompt": None, "split": None})
    prompt_help = f"default {d['prompt']!r}" if task else "default: the task's"
    split_help = f"default {d['split']}" if task else "default: the task's"
    group = parser.add_argument_group("features")
    group.add_argument("--taps", default=None,
                       help="tap(s), comma-separated (default: the family's feature tap, us6 = DIFT's map for SD)")
    group.add_argument("--size", type=int, default=None, help="model frame side (default: the model's resolution)")
    group.add_argument("--resize", default="stretch", choices=("stretch", "pad", "crop"),
                       help="how images are put into the frame (default stretch)")
    group.add_argument("--prompt", default=d["prompt"], help=f"text prompt for every image ({prompt_help})")
    group.add_argument("--extract-batch", type=int, default=4, help="images per extractor call (default 4)")
    group.add_argument("--seed", type=int, default=0, help="noise / probe seed (default 0)")
    group.add_argument("--cache-dir", default=None, help="cache per-image features here (reused across runs)")
    group.add_argument("--train-split", default="train", help="training split (default train)")
    group.add_argument("--split", default=d["split"], help=f"evaluation split ({split_help})")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


#: What ``--root`` is, per task.
ROOT_HELP = {
    "depth": "NYUv2: the labelled .mat file (or a folder holding nyu_depth_v2_labeled.mat), or a folder of "
             "[<split>/]rgb/ images + depth/ 16-bit PNGs in mm",
    "seg": "PASCAL VOC 2012: a folder with ImageSets/Segmentation/, JPEGImages/ and SegmentationClass/ "
           "(itself, or under VOC2012/ or VOCdevkit/VOC2012/)",
    "knn": "an ImageFolder tree: <root>/<split>/<class>/<image> (splits from --train-split and --split)",
}
#: ``--mode`` spellings -> what results record (``naive`` is the older spelling of ``naive-clean``).
MODES = ("clean", "noisy", "naive-clean", "naive")


def _add_common(parser: argparse.ArgumentParser, task: str) -> None:
    parser.add_argument("--root", required=True, metavar="DATASET", help=ROOT_HELP[task])
    add_model_args(parser)
    d = TASK_DEFAULTS[task]
    mode = parser.add_argument_group("extraction mode")
    mode.add_argument("--mode", default="clean", choices=MODES,
                      help="clean: the CleanDIFT student of --checkpoint (default); noisy: DIFT features; "
                           "naive-clean (or naive): the frozen model on clean images at --t, a baseline. clean "
                           "without --checkpoint is that baseline and is recorded as naive-clean")
    mode.add_argument("--t", type=int, default=d["t"], help=f"timestep of noisy / naive mode (default {d['t']})")
    mode.add_argument("--ensemble", type=int, default=1, help="noise draws averaged in noisy mode (default 1)")
    add_feature_args(parser, task)
    parser.add_argument("--out", default=None, help="write results JSON here (default: print to stdout)")
    parser.add_argument("--label", default=None, help="name of this run, stored in the results (plots use it)")


def add_train_args(parser: argparse.ArgumentParser, save_flag: bool = True) -> None:
    """Probe optimisation flags (see :class:`cleandift.eval.probe_common.ProbeTrainConfig`)."""
    group = parser.add_argument_group("probe training")
    group.add_argument("--epochs", type=int, default=20, help="epochs over the cached features (default 20)")
    group.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, AdamW)")
    group.add_argument("--batch-size", type=int, default=8, help="images per optimisation step (default 8)")
    group.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    group.add_argument("--no-standardize", action="store_true",
                       help="do not standardise feature channels inside the probe")
    if save_flag:
        group.add_argument("--save-probe", default=None,
                           help="probe weights (.safetensors); default <out>.probe.safetensors when --out is given")



# ---------------------------------------------------------------------------------------------- model / extractor
def load_model(args: argparse.Namespace):
    """Backbone, student U-Net (or ``None``) and the student's timestep input from the model flags."""
    from ..backbones import load_backbone  # noqa: PLC0415
    from ..timesteps import DIFT_TIMESTEP  # noqa: PLC0415

    backbone = load_backbone(args.model, device=resolve_device(args.device), dtype=resolve_dtype(args.dtype),
                             single_file_config=getattr(args, "single_file_config", None))
    if getattr(args, "taps", "") is None:  # results record the taps actually read
        args.taps = ",".join(backbone.default_feature_taps)
    student, timestep = None, float(DIFT_TIMESTEP)
    if args.checkpoint:
        from ..checkpoints import load_student  # noqa: PLC0415

        student, ckpt = load_student(backbone.unet, args.checkpoint)
        if ckpt.timestep is not None:
            timestep = float(ckpt.timestep)
    return backbone, student, timestep


def make_extractor(args: argparse.Namespace, backbone, student, student_timestep: float):
    """The extractor a probe sees, from ``--mode`` / ``--t`` / ``--ensemble``."""
    from ..extract import CleanExtractor, NoisyExtractor  # noqa: PLC0415

    if args.mode == "noisy":
        return NoisyExtractor(backbone, t=args.t, ensemble=args.ensemble, taps=args.taps)
    if args.mode in ("naive", "naive-clean"):
        return CleanExtractor(backbone, unet=backbone.unet, timestep=args.t, taps=args.taps)
    if student is None:
        logger.warning("--mode clean without --checkpoint: using the frozen model on clean images at t=%g "
                       "(the naive-clean baseline, not CleanDIFT); results are recorded as 'naive-clean'",
                       student_timestep)
    return CleanExtractor(backbone, unet=student, timestep=student_timestep, taps=args.taps)


def recorded_mode(args: argparse.Namespace) -> str:
    """The method results are labelled with (:func:`cleandift.eval.presets.feature_method`)."""
    from ..eval.presets import feature_method  # noqa: PLC0415

    return feature_method("naive-clean" if args.mode == "naive" else args.mode, args.checkpoint)


def feature_spec(args: argparse.Namespace):
    from ..eval.probe_common import FeatureSpec  # noqa: PLC0415

    return FeatureSpec(taps=args.taps, size=args.size, resize=args.resize, prompt=args.prompt or None,
                       batch_size=args.extract_batch, seed=args.seed)


def train_config(args: argparse.Namespace):
    from ..eval.probe_common import ProbeTrainConfig  # noqa: PLC0415

    return ProbeTrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                            weight_decay=args.weight_decay, schedule=args.schedule,
                            standardize=not args.no_standardize, seed=args.seed)


def _probe_path(args: argparse.Namespace) -> str | None:
    if args.save_probe:
        return args.save_probe
    if args.out:
        return str(Path(args.out).with_suffix("")) + ".probe.safetensors"
    return None


def _write_results(args: argparse.Namespace, result, extractor) -> None:
    from ..eval.probe_common import extractor_identity  # noqa: PLC0415

    mode = recorded_mode(args)
    payload = {**result.to_dict(), "mode": mode, "model": args.model, "checkpoint": args.checkpoint,
               "extractor": extractor_identity(extractor)}
    if mode != args.mode:
        payload["requested_mode"] = args.mode
    if args.label:
        payload["label"] = args.label
    text = json.dumps(payload, indent=2, default=str)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        logger.info("wrote %s", out)
    else:
        sys.stdout.write(text + "\n")
    summary = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    logger.info("%s (%s): %s", result.task, mode, summary)


# ---------------------------------------------------------------------------------------------- commands
def run_depth_command(args: argparse.Namespace) -> int:
    from ..eval.depth import DepthProbeConfig, open_depth_dataset, run_depth_probe  # noqa: PLC0415

    train_set = open_depth_dataset(args.root, args.train_split, args.splits_file)
    eval_set = open_depth_dataset(args.root, args.split, args.splits_file)
    backbone, student, t_student = load_model(args)
    extractor = make_extractor(args, backbone, student, t_student)
    result = run_depth_probe(extractor, train_set, eval_set, feature_spec(args), train_config(args),
                             DepthProbeConfig(eval_crop=args.eval_crop), args.cache_dir, backbone.device,
                             not args.no_progress, _probe_path(args))
    _write_results(args, result, extractor)
    return 0


def run_seg_command(args: argparse.Namespace) -> int:
    from ..eval.segmentation import VOCSegmentation, run_segmentation_probe  # noqa: PLC0415

    train_set = VOCSegmentation(args.root, args.train_split)
    eval_set = VOCSegmentation(args.root, args.split)
    backbone, student, t_student = load_model(args)
    extractor = make_extractor(args, backbone, student, t_student)
    result = run_segmentation_probe(extractor, train_set, eval_set, feature_spec(args), train_config(args), None,
                                    args.cache_dir, backbone.device, not args.no_progress, _probe_path(args))
    _write_results(args, result, extractor)
    return 0


def run_knn_command(args: argparse.Namespace) -> int:
    from ..eval.knn import ImageFolderDataset, KNNConfig, run_knn  # noqa: PLC0415

    train_set = ImageFolderDataset(args.root, args.train_split)
    eval_set = ImageFolderDataset(args.root, args.split, classes=train_set.classes)
    backbone, student, t_student = load_model(args)
    extractor = make_extractor(args, backbone, student, t_student)
    result = run_knn(extractor, train_set, eval_set, feature_spec(args),
                     KNNConfig(k=args.k, weighting=args.weighting, temperature=args.temperature,
                               readout=args.readout), args.cache_dir,
                     not args.no_progress)
    _write_results(args, result, extractor)
    return 0
