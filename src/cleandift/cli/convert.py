"""``cleandift convert``: a student U-Net -> the original (LDM) Stable Diffusion layout.

Why: ODISE-based pipelines (SD-DINO, GeoAware-SC) load U-Net weights only as ``model.diffusion_model.*``
keys, and WebUI-style tools want one SD single file. ``--to ldm-unet`` writes just the U-Net (no base
model needed: the layout is read from the keys); ``--to single-file`` writes a complete SD 1.x file with
the student in place of the base U-Net (``--model`` supplies the VAE and text encoder).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import ConfigError
from .common import DTYPES

log = logging.getLogger(__name__)

TARGETS = ("ldm-unet", "single-file")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="write a student U-Net in the original (LDM) SD layout (for ODISE / SD-DINO pipelines)",
        description="Convert a CleanDIFT student to the original Stable Diffusion (LDM) key layout. "
                    "ldm-unet: only model.diffusion_model.* keys (what ODISE-based pipelines load). "
                    "single-file: a complete SD 1.x checkpoint (U-Net + VAE + CLIP) with the student as U-Net.")
    p.add_argument("student", metavar="STUDENT",
                   help="student weights: a cleandift_*_unet/_full.safetensors, a diffusers U-Net state dict or "
                        "folder, a `cleandift train` export, or an LDM U-Net file")
    p.add_argument("--to", required=True, choices=TARGETS, help="output layout")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--model", default=None,
                   help="base backbone (preset, folder, hub id or single file); required for single-file, "
                        "optional for ldm-unet (then the student is checked against it)")
    p.add_argument("--model-config", dest="single_file_config", default=None,
                   help="diffusers folder / hub id with the configs of a single-file --model (needed offline)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="precision of the written weights (default: fp32 with --model, else as stored)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    out = Path(args.out).expanduser()
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: must end with .safetensors (pickled checkpoints are never written)")
    if args.to == "single-file" and not args.model:
        raise ConfigError("--to single-file needs --model BASE: the VAE and text encoder come from the base model")
    from ..checkpoints import read_checkpoint  # noqa: PLC0415

    ckpt = read_checkpoint(args.student)
    _report_dropped(ckpt)
    written = _convert_with_model(args, ckpt, out) if args.model else _convert_keys_only(args, ckpt, out)
    print(f"wrote {written} ({args.to}, from {ckpt.source})")
    return 0


def _convert_keys_only(args, ckpt, out: Path) -> Path:
    """ldm-unet without a base model: a pure key conversion of the student's state dict."""
    from ..ldm_format import write_ldm_unet_file  # noqa: PLC0415

    state = ckpt.student
    if args.dtype:
        state = {k: v.to(DTYPES[args.dtype]) for k, v in state.items()}
    return write_ldm_unet_file(state, out)


def _convert_with_model(args, ckpt, out: Path) -> Path:
    """Load the base backbone, fit the student into its U-Net (strict) and write the chosen layout."""
    from ..backbones.loading import load_backbone  # noqa: PLC0415
    from ..checkpoints import load_student  # noqa: PLC0415
    from ..ldm_format import student_to_ldm_unet_file, write_single_file  # noqa: PLC0415

    dtype = DTYPES[args.dtype or "fp32"]
    backbone = load_backbone(args.model, dtype=dtype, single_file_config=args.single_file_config)
    student, _ = load_student(backbone.unet, ckpt)
    if args.to == "ldm-unet":
        return student_to_ldm_unet_file(student, out)
    return write_single_file(backbone, out, unet=student)


def _report_dropped(ckpt) -> None:
    """The LDM layout has no place for projection heads or the learned timestep: say so, don't lose it silently."""
    if ckpt.heads:
        log.info("note: %d projection-head tensor(s) are not part of the LDM U-Net and are not written", len(ckpt.heads))
    if ckpt.timestep is not None:
        log.info("note: run the converted U-Net at its learned timestep input t=%.4g (not stored in LDM files)",
                 ckpt.timestep)
