"""Resolve ``--model`` (preset, diffusers folder, hub id or single-file checkpoint) to a backbone.

Device and dtype always come from the caller. Loading never silently falls back to random weights:
when nothing loads, :class:`~cleandift.errors.BackboneNotFoundError` lists every source tried, why
it failed, and the flags that fix it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import BackboneNotFoundError
from .base import DiffusionBackbone
from .presets import PRESETS, get_preset
from .stable_diffusion import StableDiffusionBackbone

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def load_backbone(
    model: str = "sd15",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    resolution: int | None = None,
    local_files_only: bool | None = None,
    single_file_config: str | None = None,
    variant: str | None = None,
) -> DiffusionBackbone:
    """Load a backbone.

    Args:
        model: a preset name (``sd15``, ``sd21``, ``mini``), a diffusers pipeline folder, a hub repo
            id, or a single-file ``.safetensors`` / ``.ckpt`` checkpoint of SD 1.x / 2.x.
        device, dtype: where and in which precision the backbone runs (default CPU / float32).
        resolution: default image size; presets know theirs, folders default to
            ``unet.config.sample_size * 8``.
        local_files_only: never touch the network (default: ``HF_HUB_OFFLINE``).
        single_file_config: diffusers folder or hub id whose configs describe a single-file
            checkpoint (needed offline; online diffusers infers it).
        variant: weight variant on the hub, e.g. ``"fp16"``.
    """
    if local_files_only is None:
        local_files_only = offline_mode()
    preset = get_preset(model)
    if preset is not None and preset.name == "mini":  # the bundled pixel-space model (no download)
        from .pixel import load_bundled_mini  # noqa: PLC0415

        return load_bundled_mini(device=device, dtype=dtype)
    candidates = list(preset.sources) if preset else [model]
    resolution = resolution or (preset.resolution if preset else None)
    errors: list[str] = []
    for source in candidates:
        try:
            backbone = _load_source(source, dtype, resolution, local_files_only, single_file_config, variant)
        except BackboneNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(f"  - {source}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        if preset:
            backbone.name = preset.name
        return backbone.to(device=device or "cpu")
    raise BackboneNotFoundError(_not_found_message(model, errors, local_files_only))


def _load_source(source: str, dtype: torch.dtype, resolution: int | None, local_files_only: bool,
                 single_file_config: str | None, variant: str | None) -> DiffusionBackbone:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise BackboneNotFoundError(f"{path}: not a checkpoint (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        return _load_single_file(path, dtype, resolution, local_files_only, single_file_config)
    if path.is_dir():
        from .pixel import is_pixel_backbone_folder, load_pixel_backbone  # noqa: PLC0415

        if is_pixel_backbone_folder(path):
            return load_pixel_backbone(path, dtype=dtype)
        if not (path / "unet").is_dir():
            raise BackboneNotFoundError(
                f"{path}: not a diffusers pipeline folder (no 'unet' subfolder); expected "
                "unet/, vae/, text_encoder/, tokenizer/, scheduler/ as written by save_pretrained"
            )
        return _load_pipeline_folder(str(path), dtype, resolution, True, None)
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such file or folder: {source}")
    return _load_pipeline_folder(source, dtype, resolution, local_files_only, variant)


def _load_pipeline_folder(source: str, dtype: torch.dtype, resolution: int | None, local_files_only: bool,
                          variant: str | None) -> StableDiffusionBackbone:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    common = {"local_files_only": local_files_only}
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, variant=variant, **common)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, variant=variant, **common)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype,
                                                 variant=variant, **common)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    resolution = resolution or int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return StableDiffusionBackbone(unet, vae, text_encoder, tokenizer, scheduler, resolution=resolution)


def _load_single_file(path: Path, dtype: torch.dtype, resolution: int | None, local_files_only: bool,
                      config: str | None) -> StableDiffusionBackbone:
    from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: PLC0415

    kwargs = {"torch_dtype": dtype, "local_files_only": local_files_only}
    if config:
        kwargs["config"] = config
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        hint = "" if config else (
            "; offline, pass --model-config DIR (a diffusers folder of the same model family whose "
            "unet/vae/text_encoder/tokenizer/scheduler configs describe this checkpoint)"
        )
        from ..ldm_format import is_ldm_unet_only_file  # noqa: PLC0415

        if is_ldm_unet_only_file(path):
            hint += ("; this file holds only an LDM U-Net (model.diffusion_model.*), e.g. a converted student: "
                     "pass it as --checkpoint together with --model BASE")
        raise BackboneNotFoundError(f"{path}: could not load as a single-file SD checkpoint: "
                                    f"{type(exc).__name__}: {_first_line(exc)}{hint}") from exc
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = resolution or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return StableDiffusionBackbone(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler,
                                   resolution=resolution)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _not_found_message(model: str, errors: list[str], local_files_only: bool) -> str:
    presets = ", ".join(PRESETS)
    lines = [f"could not load backbone {model!r}; tried:", *errors, "fix it with one of:"]
    lines.append("  --model /path/to/diffusers-folder   (a folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
    lines.append("  --model /path/to/model.safetensors [--model-config DIR]   (a single-file SD checkpoint)")
    lines.append("  --model owner/repo   (another hub id or mirror; needs network or a filled HF cache)")
    if local_files_only:
        lines.append("  unset HF_HUB_OFFLINE (offline mode only finds models already in the HF cache)")
    lines.append(f"  presets: {presets}, and 'mini' (the bundled offline model); see `cleandift env`")
    return "\n".join(lines)
