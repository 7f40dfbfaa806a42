"""Single-file checkpoints of the families diffusers reads from one file: SD 1.x/2.x, SDXL, SD3 / 3.5, Flux.1.

A single file is told apart by its key names alone (the safetensors header; nothing is read into
memory): ``model.diffusion_model.input_blocks.*`` is an LDM U-Net (SDXL when it carries SDXL's added
embedding ``label_emb.0.0`` or its ``conditioner.embedders.*`` text encoders), ``joint_blocks.*`` an
SD3 MMDiT, ``double_blocks.*`` + ``single_blocks.*`` a Black Forest Labs Flux transformer (each with or
without the ``model.diffusion_model.`` prefix), and PixArt's ``t_block`` / ``y_embedder`` / ``adaln_single``
keys a PixArt transformer, which diffusers has no single-file loader for.

What comes from where:

* SD 1.x / 2.x: ``StableDiffusionPipeline.from_single_file(file, config=--model-config)`` (U-Net, VAE
  and text encoder in the file; tokenizer and scheduler from the config).
* SDXL: ``StableDiffusionXLPipeline.from_single_file`` likewise; the U-Net must be in the file, a VAE or
  text encoders it lacks (a U-Net + VAE file, a U-Net-only fine-tune) are loaded from ``--model-config``.
* SD3 / 3.5 and Flux: only the transformer is read from the file (``<Transformer>.from_single_file``);
  VAE, text encoders, tokenizers and scheduler come from ``--model-config`` (``from_pretrained`` with
  that transformer). diffusers' Flux converter is written for FLUX.1's width (3072 channels); other
  widths are converted here (:func:`flux_to_diffusers`) and handed to the same loader.

``--model-config`` may be a local diffusers folder or, online, a hub id; online without it the config
repo is the one diffusers' ``infer_diffusers_model_type`` names for the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import BackboneNotFoundError
from .base import DiffusionBackbone

PREFIX = "model.diffusion_model."
SD, SDXL, SD3, FLUX, PIXART = "stable-diffusion", "sdxl", "sd3", "flux", "pixart"
#: Names used in messages.
FAMILY_NAMES = {SD: "SD 1.x / 2.x", SDXL: "SDXL", SD3: "SD3 / SD3.5", FLUX: "Flux.1", PIXART: "PixArt"}
#: The channel width diffusers' Flux converter assumes (FLUX.1-dev / -schnell).
FLUX_WIDTH = 3072

# ------------------------------------------------------------------------------------ Flux key layout
#: One-to-one renames, diffusers name -> BFL name (``{i}``: the block index).
FLUX_RENAMES: tuple[tuple[str, str], ...] = (
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
    ("proj_out", "final_layer.linear"),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin"),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin"),
    ("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img_attn.norm.query_norm"),
    ("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img_attn.norm.key_norm"),
    ("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt_attn.norm.query_norm"),
    ("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt_attn.norm.key_norm"),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0"),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0"),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2"),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin"),
    ("single_transformer_blocks.{i}.attn.norm_q", "single_blocks.{i}.norm.query_norm"),
    ("single_transformer_blocks.{i}.attn.norm_k", "single_blocks.{i}.norm.key_norm"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
)
#: Fused BFL tensors: BFL name -> the diffusers modules stacked along dim 0, in order.
FLUX_FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q",
                                        "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v")),
    ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                        "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj")),
    ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q",
                                   "single_transformer_blocks.{i}.attn.to_k",
                                   "single_transformer_blocks.{i}.attn.to_v",
                                   "single_transformer_blocks.{i}.proj_mlp")),
)
#: BFL's final modulation is (shift, scale); diffusers' ``AdaLayerNormContinuous`` reads (scale, shift).
FLUX_SWAPPED = (("norm_out.linear", "final_layer.adaLN_modulation.1"),)
#: RMSNorm weights are called ``scale`` in BFL's code.
_BFL_NORM = re.compile(r".*\.(query|key)_norm$")


def _bfl_param(module: str, param: str) -> str:
    return "scale" if _BFL_NORM.fullmatch(module) and param == "weight" else param


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_blocks(keys, double: str = "double_blocks", single: str = "single_blocks") -> tuple[int, int]:
    """Number of double and single blocks named in ``keys``."""
    def count(name):
        found = [int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))]
        return max(found) + 1 if found else 0
    return count(double), count(single)


def flux_to_diffusers(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL Flux transformer keys (optionally under ``model.diffusion_model.``) -> diffusers keys, any width.

    The inverse of :func:`cleandift.testing.original_formats.flux_to_original`; diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers`` does the same for FLUX.1's width only.
    Raises ``KeyError`` naming the first missing tensor.
    """
    bfl = {k.removeprefix(PREFIX): v for k, v in checkpoint.items()}
    n_double, n_single = flux_blocks(bfl)
    out: dict[str, torch.Tensor] = {}

    def indices(pattern):
        if "{i}" not in pattern:
            return [None]
        return range(n_double if pattern.startswith("double_blocks") else n_single)

    for diffusers_name, bfl_name in FLUX_RENAMES:
        for i in indices(bfl_name):
            src, dst = bfl_name.format(i=i), diffusers_name.format(i=i)
            for param in ("weight", "bias"):
                key = f"{src}.{_bfl_param(src, param)}"
                if key in bfl:
                    out[f"{dst}.{param}"] = bfl[key]
    for bfl_name, parts in FLUX_FUSED:
        for i in indices(bfl_name):
            fused = bfl_name.format(i=i)
            names = [p.format(i=i) for p in parts]
            for param in ("weight", "bias"):
                tensor = bfl[f"{fused}.{param}"]
                if len(names) == 3:
                    pieces = tensor.chunk(3, dim=0)
                else:  # q, k, v of the block's width, then the MLP input
                    width = tensor.shape[1] if param == "weight" else _width(bfl)
                    pieces = tensor.split([width, width, width, tensor.shape[0] - 3 * width], dim=0)
                for name, piece in zip(names, pieces):
                    out[f"{name}.{param}"] = piece.contiguous()
    for diffusers_name, bfl_name in FLUX_SWAPPED:
        for param in ("weight", "bias"):
            out[f"{diffusers_name}.{param}"] = _swap_halves(bfl[f"{bfl_name}.{param}"])
    return out


def _width(bfl: dict[str, torch.Tensor]) -> int:
    return int(bfl["img_in.weight"].shape[0])


# --------------------------------------------------------------------------------------- detection


def checkpoint_keys(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Key names and shapes of a checkpoint (safetensors: header only). ``None`` when the format is not
    readable here (a pickled ``.ckpt`` that is not a zip archive): it then takes the SD 1.x/2.x path.

    Raises :class:`BackboneNotFoundError` for a damaged ``.safetensors`` file.
    """
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open  # noqa: PLC0415

        try:
            with safe_open(str(path), framework="pt") as handle:
                names = handle.keys()  # a safetensors handle, not a dict
                return {k: tuple(handle.get_slice(k).get_shape()) for k in names}
        except Exception as exc:  # noqa: BLE001
            raise BackboneNotFoundError(f"{path}: damaged or truncated checkpoint ({_first_line(exc)}); "
                                        "download or write it again") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - diffusers reports it on the SD path, as before
        return None
    state = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state, dict):
        return None
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(k, str) and hasattr(v, "shape")}


def detect_family(keys) -> str:
    """The family of a single file from its key names (:data:`SD` when nothing more specific matches)."""
    bare = [k.removeprefix(PREFIX) for k in keys]
    def has(start):
        return any(k.startswith(start) for k in bare)

    if has("double_blocks.") and has("single_blocks."):
        return FLUX
    if has("single_transformer_blocks."):
        return FLUX
    if has("joint_blocks."):
        return SD3
    if any(k.startswith(("t_block.", "y_embedder.y_proj.", "adaln_single.", "caption_projection."))
           or re.match(r"blocks\.\d+\.cross_attn\.", k) for k in bare):
        return PIXART
    if has("transformer_blocks.") and has("context_embedder."):
        return SD3  # diffusers' own layout (e.g. transformer/diffusion_pytorch_model.safetensors)
    if any(k.startswith("conditioner.embedders.") for k in keys) or any(
            k.startswith(PREFIX + "label_emb.0.0.") for k in keys):
        return SDXL
    return SD


# ------------------------------------------------------------------------------------------ loading


def load_single_file(path: Path, dtype: torch.dtype, resolution: int | None, local_files_only: bool,
                     config: str | None, load_sd) -> DiffusionBackbone:
    """Load a single-file checkpoint of any supported family.

    ``load_sd`` loads SD 1.x / 2.x files (``loading._load_single_file``: its messages stay as they were).
    """
    keys = checkpoint_keys(path)
    family = SD if keys is None else detect_family(keys)
    if family == PIXART:
        raise BackboneNotFoundError(
            f"{path}: a PixArt transformer checkpoint; PixArt is not supported by diffusers single-file "
            "loading: pass a diffusers PixArt folder or hub id as --model "
            "(e.g. PixArt-alpha/PixArt-Sigma-XL-2-1024-MS)")
    if family == SD:
        return load_sd(path, dtype, resolution, local_files_only, config)
    _check_config_family(path, family, config, local_files_only)
    name = FAMILY_NAMES[family]
    if family == SDXL:
        loader = _load_sdxl  # diffusers finds SDXL's configs itself when online
    else:
        loader = _load_sd3 if family == SD3 else _load_flux
        if config is None:
            config = _default_config(path, family, keys, local_files_only)
    return _guarded(path, name, config,
                    lambda: loader(path, keys, dtype, resolution, local_files_only, config))


def _guarded(path: Path, name: str, config: str | None, load):
    """Run ``load``; any failure becomes one line naming the file, the family and the fix."""
    try:
        return load()
    except BackboneNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        hint = "" if config else f"; offline, pass {_config_flag(name)}"
        raise BackboneNotFoundError(f"{path}: could not load as a single-file {name} checkpoint: "
                                    f"{type(exc).__name__}: {_first_line(exc)}{hint}") from exc


def _config_flag(name: str) -> str:
    return (f"--model-config DIR (a diffusers {name} folder whose configs, VAE, text encoders, tokenizers "
            "and scheduler go with this checkpoint)")


def _check_config_family(path: Path, family: str, config: str | None, local_files_only: bool) -> None:
    """A local ``--model-config`` folder of another family fails early, naming both."""
    if not config or not Path(config).expanduser().is_dir():
        return
    from .families import family_for, pipeline_class_of  # noqa: PLC0415

    try:
        found = family_for(pipeline_class_of(str(Path(config).expanduser()), local_files_only))
    except ValueError:
        return  # an unreadable model_index.json is reported by diffusers
    if found is not None and found.name != family:
        raise BackboneNotFoundError(
            f"{path}: a {FAMILY_NAMES[family]} checkpoint, but --model-config {config} is a "
            f"{FAMILY_NAMES.get(found.name, found.name)} folder; "
            f"pass a diffusers {FAMILY_NAMES[family]} folder")


#: ``infer_diffusers_model_type`` answers of each transformer family (prefixes).
_MODEL_TYPES = {SD3: ("sd3", "sd35"), FLUX: ("flux-dev", "flux-schnell")}


def _default_config(path: Path, family: str, keys, local_files_only: bool) -> str:
    """Online without ``--model-config``: the diffusers repo diffusers itself would pick for this file."""
    name = FAMILY_NAMES[family]
    if local_files_only:
        raise BackboneNotFoundError(f"{path}: a single-file {name} checkpoint holds only the transformer; "
                                    f"offline, pass {_config_flag(name)}")
    from diffusers.loaders.single_file_utils import (  # noqa: PLC0415
        DIFFUSERS_DEFAULT_PIPELINE_PATHS,
        infer_diffusers_model_type,
    )

    shapes = {k: SimpleNamespace(shape=shape) for k, shape in keys.items()}  # what the inference reads
    try:
        model_type = infer_diffusers_model_type(shapes)
    except Exception:  # noqa: BLE001
        model_type = None
    if model_type is None or not model_type.startswith(_MODEL_TYPES[family]):  # e.g. a smaller fine-tune
        raise BackboneNotFoundError(f"{path}: diffusers cannot tell which {name} model this file is "
                                    f"(inferred {model_type!r}); pass {_config_flag(name)}")
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]


def _load_sdxl(path: Path, keys, dtype, resolution, local_files_only: bool, config: str | None):
    """``StableDiffusionXLPipeline.from_single_file``; a VAE or text encoders the file lacks come from
    ``config``.

    diffusers reads text encoders from the file only when it holds OpenCLIP-G, and looks for components
    missing from the file under diffusers' weight names only (a transformers text encoder saved by
    ``save_pretrained`` is ``model.safetensors``), so missing ones are loaded here and passed in.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline  # noqa: PLC0415
    from diffusers.loaders.single_file_utils import is_clip_model_in_single_file  # noqa: PLC0415
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    from .sdxl import StableDiffusionXLBackbone  # noqa: PLC0415

    common = {"torch_dtype": dtype, "local_files_only": local_files_only}
    missing = {}
    if not any(k.startswith("first_stage_model.") for k in keys):
        missing["vae"] = (AutoencoderKL, "VAE (first_stage_model.*)")
    if not is_clip_model_in_single_file(CLIPTextModel, keys):
        missing["text_encoder"] = (CLIPTextModel, "OpenCLIP-G text encoder (conditioner.embedders.1.model.*)")
        missing["text_encoder_2"] = (CLIPTextModelWithProjection, "")
    if missing and not config:
        what = " and no ".join(text for _, text in missing.values() if text)
        raise BackboneNotFoundError(f"{path}: this SDXL single file holds no {what}; "
                                    f"pass {_config_flag('SDXL')}")
    components = {name: cls.from_pretrained(config, subfolder=name, **common)
                  for name, (cls, _) in missing.items()}
    kwargs = {"config": config} if config else {}
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), add_watermarker=False, **kwargs, **common,
                                                      **components)
    return StableDiffusionXLBackbone(pipe, resolution=resolution)


def _load_sd3(path: Path, keys, dtype, resolution, local_files_only: bool, config: str):
    from diffusers import SD3Transformer2DModel  # noqa: PLC0415

    from . import sd3  # noqa: PLC0415

    transformer = SD3Transformer2DModel.from_single_file(str(path), config=config, subfolder="transformer",
                                                        torch_dtype=dtype, local_files_only=local_files_only)
    return sd3.load(config, dtype=dtype, resolution=resolution, local_files_only=local_files_only,
                    components={"transformer": transformer})


def _load_flux(path: Path, keys, dtype, resolution, local_files_only: bool, config: str):
    from diffusers import FluxTransformer2DModel  # noqa: PLC0415

    from . import flux  # noqa: PLC0415

    widths = [shape[0] for k, shape in keys.items() if k.removeprefix(PREFIX) == "img_in.weight"]
    width = widths[0] if widths else FLUX_WIDTH
    source = str(path)
    if width != FLUX_WIDTH:  # diffusers' converter splits the single blocks at 3072 channels
        source = flux_to_diffusers(_read_state(path))
    transformer = FluxTransformer2DModel.from_single_file(
        source, config=config, subfolder="transformer", torch_dtype=dtype, local_files_only=local_files_only)
    return flux.load(config, dtype=dtype, resolution=resolution, local_files_only=local_files_only,
                     components={"transformer": transformer})


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return state.get("state_dict", state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
