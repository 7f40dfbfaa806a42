"""Exporting a trained student in the formats :mod:`cleandift.checkpoints` (and others) read.

``RUN_DIR/export/`` gets::

    unet/                         diffusers U-Net folder (save_pretrained): config.json + weights
    heads.safetensors             projection heads with the reference key names, plus ``timestep``
    cleandift.json                {"timestep", "taps", "head_config", "backbone", ...}
    cleandift_unet.safetensors    the reference *_unet layout: a plain U-Net state dict

``cleandift.checkpoints.read_checkpoint(export_dir)`` / ``load_student(unet, export_dir)`` load it
with no extra arguments; ``UNet2DConditionModel.from_pretrained(export_dir / "unet")`` works too.
Optionally (``full=True``) ``cleandift_full.safetensors`` in the reference ``*_full`` layout
(student, teacher, heads, timestep; no VAE). The folder is written next to the target and renamed
into place, so a crash never leaves half an export.

A LoRA student exports both ways (no ``cleandift_unet.safetensors`` duplicate)::

    unet/                                  the denoiser (U-Net or transformer) with the adapters merged in
    lora/pytorch_lora_weights.safetensors  the adapters in diffusers' LoRA layout (``pipe.load_lora_weights``)
    lora/cleandift.json                    the student timestep and settings, so ``--checkpoint .../lora`` works
    heads.safetensors, cleandift.json      as above
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoints import EXPORT_HEADS, EXPORT_META
from ..distill import FeatureAligner
from ..version import __version__

UNET_FILE = "cleandift_unet.safetensors"
FULL_FILE = "cleandift_full.safetensors"


def export_run(aligner: FeatureAligner, out_dir: str | Path, *, config=None, full: bool = False,
               dtype: torch.dtype | None = None) -> Path:
    """Write the student (+ heads, timestep, metadata) to ``out_dir``; returns ``out_dir``.

    ``dtype`` casts the saved weights (e.g. ``torch.bfloat16`` halves the files, as the released
    ones); default: as trained (float32).
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if aligner.student_kind == "lora":
        _write_lora_student(aligner, tmp, config, dtype)
        _replace_dir(tmp, out_dir)
        return out_dir
    student = aligner.student
    state = _cast(student.state_dict(), dtype)
    if dtype is None:
        student.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    else:  # save_pretrained cannot cast; write the same two files by hand
        (tmp / "unet").mkdir()
        student.save_config(str(tmp / "unet"))
        save_file(state, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    save_file(state, str(tmp / UNET_FILE))
    save_file(_cast(heads_state_dict(aligner), dtype), str(tmp / EXPORT_HEADS))
    if full:
        save_file(_cast(aligner.reference_state_dict(include_teacher=True), dtype), str(tmp / FULL_FILE))
    (tmp / EXPORT_META).write_text(json.dumps(export_metadata(aligner, config), indent=2), encoding="utf-8")
    _replace_dir(tmp, out_dir)
    return out_dir


def _write_lora_student(aligner: FeatureAligner, tmp: Path, config, dtype: torch.dtype | None) -> None:
    """``unet/`` (merged), ``lora/`` (adapters + metadata), heads and ``cleandift.json``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from ..lora import adapter_metadata, lora_state_dict, merged_state_dict, pipeline_prefix, save_lora_file  # noqa: PLC0415

    denoiser = aligner.student
    (tmp / "unet").mkdir()
    denoiser.save_config(str(tmp / "unet"))
    save_file(merged_state_dict(denoiser, dtype), str(tmp / "unet" / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    prefix = pipeline_prefix(denoiser)
    save_lora_file(tmp / "lora", lora_state_dict(denoiser), adapter_metadata(denoiser), prefix, dtype)
    save_file(_cast(heads_state_dict(aligner), dtype), str(tmp / EXPORT_HEADS))
    meta = export_metadata(aligner, config)
    meta["files"] = {"unet": "unet/ (adapters merged)", "lora": "lora/pytorch_lora_weights.safetensors",
                     "heads": EXPORT_HEADS}
    meta["lora_prefix"] = prefix
    text = json.dumps(meta, indent=2)
    (tmp / EXPORT_META).write_text(text, encoding="utf-8")
    (tmp / "lora" / EXPORT_META).write_text(text, encoding="utf-8")


def heads_state_dict(aligner: FeatureAligner) -> dict[str, torch.Tensor]:
    """Heads with the reference key names (``adapters.*``, ``mapping.*``, ``time_in_proj.*``,
    ``time_emb.weight``) plus the learned ``timestep``."""
    state = {k: v.detach().contiguous() for k, v in aligner.state_dict().items()
             if not k.startswith(("unet_feature_extractor_cleandift.", "unet_feature_extractor_lora."))}
    state["timestep"] = aligner.timestep.detach().float().reshape(())
    return state


def export_metadata(aligner: FeatureAligner, config=None) -> dict:
    meta = {
        "format": "cleandift-export",
        "cleandift_version": __version__,
        "timestep": float(aligner.timestep.detach()),
        "taps": aligner.tap_names,
        "head_config": aligner.head_config.to_dict() if aligner.head_config else None,
        "backbone": aligner.backbone.describe(),
        "distill": {k: v for k, v in aligner.describe().items() if k != "backbone"},
        "files": {"unet": "unet/", "heads": EXPORT_HEADS, "reference_unet": UNET_FILE},
    }
    if config is not None:
        meta["train_config"] = config.to_dict()
    return meta


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().cpu()
    return out


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` into ``target``; an existing target is moved aside first and removed after."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_student_folder(export_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = torch.float16,
                         heads: bool = False) -> Path:
    """A compact, loadable copy of an export: ``unet/`` (weights in ``dtype``) + ``cleandift.json``.

    What ships inside the package for the ``mini`` model: the reference ``*_unet.safetensors`` duplicate
    is left out, and the heads too unless ``heads`` (inference drops them). ``read_checkpoint`` /
    ``--checkpoint`` load the result like any export.
    """
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    src, out = Path(export_dir), Path(out_dir)
    unet_src = src / "unet"
    if not (unet_src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a `cleandift train` export (no unet/config.json)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "unet").mkdir(parents=True)
    shutil.copy2(unet_src / "config.json", tmp / "unet" / "config.json")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(unet_src.glob("diffusion_pytorch_model*.safetensors")):
        state.update(load_file(str(file)))
    save_file(_cast(state, dtype), str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    if heads and (src / EXPORT_HEADS).is_file():
        save_file(_cast(load_file(str(src / EXPORT_HEADS)), dtype), str(tmp / EXPORT_HEADS))
    if (src / EXPORT_META).is_file():
        shutil.copy2(src / EXPORT_META, tmp / EXPORT_META)
    _replace_dir(tmp, out)
    return out
