"""Resolve ``--model`` (preset, diffusers folder, hub id or single-file checkpoint) to a backbone.

Device and dtype always come from the caller. Loading never silently falls back to random weights:
when nothing loads, :class:`~cleandift.errors.BackboneNotFoundError` lists every source tried, why
it failed, and the flags that fix it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from ..errors import BackboneNotFoundError
from ..hub import hub_cache_dir, hub_endpoint, hub_unreachable_reason, in_hub_cache, offline_mode
from .base import DiffusionBackbone
from .presets import PRESETS, get_preset
from .stable_diffusion import StableDiffusionBackbone

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def load_backbone(
    model: str = "sd15",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    resolution: int | None = None,
    local_files_only: bool | None = None,
    single_file_config: str | None = None,
    variant: str | None = None,
    offload: bool = False,
) -> DiffusionBackbone:
    """Load a backbone.

    Hub ids are loaded from the local HF cache when it has them (no network); otherwise the hub is
    checked once (a request bounded to 1.5 s) and, when it cannot be reached, the error says so right
    away instead of retrying every file of every mirror for over a minute.

    Args:
        model: a preset name (``sd15``, ``sd21``, ``mini``), a diffusers pipeline folder, a hub repo
            id, or a single-file ``.safetensors`` / ``.ckpt`` checkpoint of SD 1.x / 2.x, SDXL, SD3 / 3.5
            or Flux.1 (:mod:`.single_file`; SD3 / Flux files give the transformer, ``single_file_config``
            the rest).
        device, dtype: where and in which precision the backbone runs (default CPU / float32).
        resolution: default image size; presets know theirs, folders default to
            ``unet.config.sample_size * 8``.
        local_files_only: never touch the network (default: ``HF_HUB_OFFLINE``).
        single_file_config: diffusers folder or hub id whose configs describe a single-file
            checkpoint (needed offline; online diffusers infers it).
        variant: weight variant on the hub, e.g. ``"fp16"``.
        offload: keep the weights in CPU memory and move each model (text encoders, denoiser, VAE) to
            ``device`` only while it runs (diffusers' model CPU offload): Flux or SD3 on one GPU that cannot
            hold every model at once. Pipeline families only (SDXL, SD3, PixArt, Flux).
    """
    if local_files_only is None:
        local_files_only = offline_mode()
    preset = get_preset(model)
    if preset is not None and preset.name == "mini":  # the bundled pixel-space model (no download)
        from .pixel import load_bundled_mini  # noqa: PLC0415

        return load_bundled_mini(device=device, dtype=dtype)
    candidates = list(preset.sources) if preset else [model]
    resolution = resolution or (preset.resolution if preset else None)
    errors: dict[str, str] = {}
    # pass 1: local files and hub ids already in the HF cache -- no network
    for source in candidates:
        hub = is_hub_id(source)
        if hub and not _cached_pipeline(source):
            errors[source] = f"not in the local Hugging Face cache ({hub_cache_dir()})"
            continue
        offline = local_files_only or hub or _single_file_offline(source, single_file_config)
        backbone = _try_source(source, errors, dtype, resolution, offline, single_file_config, variant)
        if backbone is not None:
            return _finish(backbone, preset, device, offload)
    # pass 2: download the hub ids, if allowed and the hub answers
    online = [source for source in candidates if is_hub_id(source)]
    if local_files_only or not online:
        raise BackboneNotFoundError(_not_found_message(model, errors, local_files_only))
    reason = hub_unreachable_reason()
    if reason is not None:
        raise BackboneNotFoundError(_unreachable_message(model, online, reason))
    for source in online:
        backbone = _try_source(source, errors, dtype, resolution, False, single_file_config, variant)
        if backbone is not None:
            return _finish(backbone, preset, device, offload)
    raise BackboneNotFoundError(_not_found_message(model, errors, local_files_only))


def is_hub_id(source: str) -> bool:
    """``owner/repo`` that is not an existing local path (a path always wins over a hub id)."""
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        return False
    return not Path(source).expanduser().exists()


def _cached_pipeline(repo_id: str) -> bool:
    return any(in_hub_cache(repo_id, name) for name in ("model_index.json", "unet/config.json"))


def _single_file_offline(source: str, single_file_config: str | None) -> bool:
    """A single file is loaded offline when its configs are local or the hub (their default source) is down."""
    if not Path(source).expanduser().is_file():
        return False
    if single_file_config and not is_hub_id(single_file_config):
        return True
    return hub_unreachable_reason() is not None


def _try_source(source: str, errors: dict[str, str], dtype: torch.dtype, resolution: int | None,
                local_files_only: bool, single_file_config: str | None,
                variant: str | None) -> DiffusionBackbone | None:
    """Load one candidate; on failure record why in ``errors`` (errors about a user's path propagate)."""
    try:
        with _quiet_hub():
            return _load_source(source, dtype, resolution, local_files_only, single_file_config, variant)
    except BackboneNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - collected and reported by the caller
        errors[source] = f"{type(exc).__name__}: {_first_line(exc)}"
        return None


def _finish(backbone: DiffusionBackbone, preset, device: torch.device | str | None,
            offload: bool = False) -> DiffusionBackbone:
    if preset:
        backbone.name = preset.name
    if offload:
        backbone.enable_model_offload(device or "cpu")
        return backbone
    return backbone.to(device=device or "cpu")


@contextlib.contextmanager
def _quiet_hub():
    """Hide deprecation warnings diffusers triggers on every load: noise the user can do nothing about
    (download retries on a flaky network stay visible)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        # newer diffusers releases rename from_pretrained's torch_dtype to dtype; older ones (our floor) know
        # only torch_dtype, so the family loaders pass it and its deprecation notice is not the user's concern
        warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated.*", category=FutureWarning)
        yield


def _load_source(source: str, dtype: torch.dtype, resolution: int | None, local_files_only: bool,
                 single_file_config: str | None, variant: str | None) -> DiffusionBackbone:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise BackboneNotFoundError(f"{path}: not a checkpoint (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        from .single_file import load_single_file  # noqa: PLC0415

        return load_single_file(path, dtype, resolution, local_files_only, single_file_config,
                                _load_single_file)
    if path.is_dir():
        from .pixel import is_pixel_backbone_folder, load_pixel_backbone  # noqa: PLC0415

        if is_pixel_backbone_folder(path):
            return load_pixel_backbone(path, dtype=dtype)
        family = _other_family(str(path), True)
        if family is not None:
            return family.loader()(str(path), dtype=dtype, resolution=resolution, local_files_only=True,
                                   variant=variant)
        if not (path / "unet").is_dir():
            raise BackboneNotFoundError(
                f"{path}: not a diffusers pipeline folder (no 'unet' subfolder); expected "
                "unet/, vae/, text_encoder/, tokenizer/, scheduler/ as written by save_pretrained"
            )
        return _load_pipeline_folder(str(path), dtype, resolution, True, None)
    if not is_hub_id(source):
        raise FileNotFoundError(f"no such file or folder: {source}")
    family = _other_family(source, local_files_only)
    if family is not None:
        return family.loader()(source, dtype=dtype, resolution=resolution, local_files_only=local_files_only,
                               variant=variant)
    return _load_pipeline_folder(source, dtype, resolution, local_files_only, variant)


def _other_family(source: str, local_files_only: bool):
    """The :class:`~.families.Family` of a folder / repo whose pipeline is not SD 1.x/2.x (else ``None``)."""
    from .families import family_for, pipeline_class_of  # noqa: PLC0415

    family = family_for(pipeline_class_of(source, local_files_only))
    return family if family is not None and family.name != "stable-diffusion" else None


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


def _not_found_message(model: str, errors: dict[str, str], local_files_only: bool) -> str:
    lines = [f"could not load backbone {model!r}; tried:", *(f"  - {src}: {why}" for src, why in errors.items())]
    lines += _gated_lines(model, [src for src, why in errors.items() if _is_gated(why)])
    lines.append("fix it with one of:")
    lines += _fix_lines()
    lines.append("  --model owner/repo   (another hub id or mirror; needs network or a filled HF cache)")
    if local_files_only:
        lines.append("  unset HF_HUB_OFFLINE (offline mode only finds models already in the HF cache)")
    lines.append(f"  {_presets_line()}")
    return "\n".join(lines)


def _gated_lines(model: str, gated: list[str]) -> list[str]:
    """What a gated model needs: named when the hub said so, or when the preset is known to be gated."""
    preset = get_preset(model)
    if not gated and (preset is None or not preset.gated):
        return []
    repos = ", ".join(gated or preset.sources)
    return [f"{repos} is a gated model: accept the licence on its hub page and log in (`huggingface-cli login` "
            "or HF_TOKEN) before loading it"]


def _is_gated(why: str) -> bool:
    """huggingface_hub's answer for a gated repo without an accepted licence (401 / 403 / GatedRepoError)."""
    return any(k in why for k in ("GatedRepoError", "gated", "401 Client Error", "403 Client Error"))


def _unreachable_message(model: str, sources: list[str], reason: str) -> str:
    lines = [f"could not load backbone {model!r}: the Hugging Face hub ({hub_endpoint()}) cannot be reached "
             f"({reason})",
             f"  and the local cache ({hub_cache_dir()}) does not hold {', '.join(sources)}",
             *_gated_lines(model, []), "fix it with one of:"]
    lines += _fix_lines()
    lines.append("  go online once to download it into the cache (afterwards HF_HUB_OFFLINE=1 loads it with "
                 "no network at all), or set HF_ENDPOINT to a reachable mirror")
    lines.append(f"  {_presets_line()}")
    return "\n".join(lines)


def _fix_lines() -> list[str]:
    return [
        "  --model /path/to/diffusers-folder   (a folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/)",
        "  --model /path/to/model.safetensors [--model-config DIR]   "
        "(a single-file SD / SDXL / SD3 / Flux checkpoint)",
        "  --model mini   (the bundled model: no download, runs on a CPU)",
    ]


def _presets_line() -> str:
    hub = ", ".join(name for name in PRESETS if name != "mini")
    return f"presets: {hub} (downloaded from the hub), mini (bundled, offline); see `cleandift env`"
