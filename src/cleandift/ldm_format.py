"""Diffusers <-> original (CompVis / LDM) Stable Diffusion key layout.

Why: users bring single-file checkpoints in the LDM layout (``model.diffusion_model.*`` U-Net,
``first_stage_model.*`` VAE, ``cond_stage_model.transformer.*`` CLIP), and ODISE-based pipelines
(SD-DINO, GeoAware-SC) load a CleanDIFT student only as LDM U-Net keys. This module writes that layout
from diffusers models (and reads LDM U-Net keys back), so both directions can be tested offline.

The mapping is structural and key-local: a diffusers key's LDM name depends only on its block / layer
indices, ``layers_per_block`` and whether the up block has attentions. Everything needed is either in
the U-Net config or readable from the keys themselves, so :func:`unet_from_ldm` needs no config.

Scope: SD 1.x / 2.x U-Nets and VAEs, and the SD 1.x (OpenAI CLIP) text encoder. SD 2.x text encoders
live in OpenCLIP's layout (fused q/k/v, 24 layers of which diffusers keeps 23) and are not written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointMismatchError, CleanDIFTError

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_OPENCLIP_PREFIX = "cond_stage_model.model."
LDM_OTHER_MODEL_PREFIXES = (LDM_VAE_PREFIX, "cond_stage_model.", "conditioner.")

StateDict = dict[str, torch.Tensor]


class UnsupportedConversionError(CleanDIFTError, NotImplementedError):
    """A model the LDM layout cannot express here (SD 2.x text encoder, non-SD U-Nets)."""

# ---------------------------------------------------------------------------------------------- U-Net

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SD_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_SD_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}

_DOWN_RE = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_MID_RE = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_UP_RE = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")


def _split_param(key: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``."""
    module, _, param = key.rpartition(".")
    return module, param


def _resnet_to_ldm(sub: str) -> str:
    """Rename a ResnetBlock2D sub-key (``norm1.weight`` -> ``in_layers.0.weight``)."""
    head, _, param = sub.partition(".")
    if head not in _UNET_RESNET:
        raise CheckpointMismatchError(f"unknown resnet parameter {sub!r}")
    return f"{_UNET_RESNET[head]}.{param}"


def _resnet_from_ldm(sub: str) -> str:
    for diffusers_name, ldm_name in _UNET_RESNET.items():
        if sub.startswith(ldm_name + "."):
            return diffusers_name + sub[len(ldm_name):]
    raise CheckpointMismatchError(f"unknown LDM resnet parameter {sub!r}")


def _check_unet_config(config: Mapping[str, Any]) -> int:
    """Validate that ``config`` is an SD-style U-Net and return ``layers_per_block``."""
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise UnsupportedConversionError(f"layers_per_block={layers!r} (per block) has no SD 1.x / 2.x LDM equivalent")
    unsupported = [name for name in ("class_embed_type", "addition_embed_type", "num_class_embeds",
                                     "encoder_hid_dim_type") if config.get(name) is not None]
    block_types = set(config.get("down_block_types", ())) - _SD_DOWN | set(config.get("up_block_types", ())) - _SD_UP
    if unsupported or block_types:
        raise UnsupportedConversionError(
            f"only Stable Diffusion 1.x / 2.x U-Nets convert to the LDM layout; this one has "
            f"{', '.join(unsupported + sorted(block_types))}"
        )
    return layers


def _infer_layers_per_block(keys: list[str]) -> int:
    """``layers_per_block`` of a diffusers U-Net from its resnet indices."""
    indices = [int(m.group(3)) for m in map(_DOWN_RE.fullmatch, keys) if m and m.group(2) == "resnets"]
    if not indices:
        raise CheckpointMismatchError("no down_blocks.*.resnets.* keys: not a diffusers UNet2DConditionModel")
    return max(indices) + 1


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """LDM name (without ``model.diffusion_model.``) of one diffusers U-Net key."""
    module, param = _split_param(key)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    per_block = layers_per_block + 1  # LDM gives the down/upsampler its own slot after the layers
    if m := _DOWN_RE.fullmatch(key):
        block, kind, layer, sub = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * per_block + layers_per_block}.0.op.{sub.removeprefix('conv.')}"
        slot = 1 + block * per_block + layer
        return f"input_blocks.{slot}.0.{_resnet_to_ldm(sub)}" if kind == "resnets" else f"input_blocks.{slot}.1.{sub}"
    if m := _MID_RE.fullmatch(key):
        kind, index, sub = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_resnet_to_ldm(sub)}"
        return f"middle_block.{2 * index + 1}.{sub}"
    if m := _UP_RE.fullmatch(key):
        block, kind, layer, sub = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "upsamplers":
            position = 2 if block in up_blocks_with_attention else 1  # after the resnet (and the attention)
            return f"output_blocks.{block * per_block + layers_per_block}.{position}.{sub}"
        slot = block * per_block + layer
        return f"output_blocks.{slot}.0.{_resnet_to_ldm(sub)}" if kind == "resnets" else f"output_blocks.{slot}.1.{sub}"
    raise CheckpointMismatchError(f"U-Net key {key!r} has no LDM equivalent (not an SD 1.x / 2.x U-Net?)")


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                prefix: str = LDM_UNET_PREFIX) -> StateDict:
    """Diffusers ``UNet2DConditionModel`` state dict -> LDM keys (``model.diffusion_model.*``).

    ``config`` (the U-Net's config) is validated when given; without it the structure is read from
    the keys. Tensors are shared, not copied. Transformer sub-keys (``proj_in``, ``transformer_blocks``,
    ``proj_out``) are identical in both layouts, including their shapes: SD 1.x uses 1x1 convs and SD 2.x
    linears on both sides (LDM's ``use_linear_in_transformer`` == diffusers' ``use_linear_projection``).
    """
    keys = list(state_dict)
    layers = _check_unet_config(config) if config is not None else _infer_layers_per_block(keys)
    with_attention = {int(m.group(1)) for m in map(_UP_RE.fullmatch, keys) if m and m.group(2) == "attentions"}
    out: StateDict = {}
    for key, value in state_dict.items():
        out[prefix + unet_key_to_ldm(key, layers, with_attention)] = value
    if len(out) != len(state_dict):
        raise CheckpointMismatchError("two U-Net keys map to one LDM name (config's layers_per_block is wrong?)")
    return out


def _infer_ldm_layers_per_block(keys: list[str]) -> int:
    """``layers_per_block`` of an LDM U-Net: the first down/upsampler sits right after the layers."""
    ops = [int(k.split(".")[1]) - 1 for k in keys if re.fullmatch(r"input_blocks\.\d+\.0\.op\.\w+", k)]
    ups = [int(k.split(".")[1]) for k in keys if re.fullmatch(r"output_blocks\.\d+\.[12]\.conv\.\w+", k)]
    if ops or ups:
        return min(ops + ups)
    inputs = [int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.")]
    return max(inputs, default=2)  # one block, no samplers: slots 1..layers (2: SD's value)


def unet_key_from_ldm(key: str, layers_per_block: int) -> str:
    """Diffusers name of one LDM U-Net key (without ``model.diffusion_model.``)."""
    for diffusers_name, ldm_name in _UNET_TOP.items():
        if key.startswith(ldm_name + ".") and key.count(".") == ldm_name.count(".") + 1:
            return diffusers_name + key[len(ldm_name):]
    per_block = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        block, layer = divmod(int(m.group(1)) - 1, per_block)
        part, sub = int(m.group(2)), m.group(3)
        if part == 0 and sub.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{sub[3:]}"
        if part == 0:
            return f"down_blocks.{block}.resnets.{layer}.{_resnet_from_ldm(sub)}"
        return f"down_blocks.{block}.attentions.{layer}.{sub}"
    if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", key):
        index, sub = int(m.group(1)), m.group(2)
        if index % 2 == 0:
            return f"mid_block.resnets.{index // 2}.{_resnet_from_ldm(sub)}"
        return f"mid_block.attentions.{index // 2}.{sub}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        block, layer = divmod(int(m.group(1)), per_block)
        part, sub = int(m.group(2)), m.group(3)
        if part == 0:
            return f"up_blocks.{block}.resnets.{layer}.{_resnet_from_ldm(sub)}"
        if sub.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.{sub}"
        return f"up_blocks.{block}.attentions.{layer}.{sub}"
    raise CheckpointMismatchError(f"LDM U-Net key {key!r} is not part of an SD 1.x / 2.x U-Net")


def unet_from_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = LDM_UNET_PREFIX) -> StateDict:
    """LDM U-Net keys (``model.diffusion_model.*``) -> diffusers ``UNet2DConditionModel`` keys.

    Keys outside ``prefix`` are ignored; the block structure is read from the keys (no config needed).
    """
    unet = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not unet:
        raise CheckpointMismatchError(f"no {prefix}* keys: not an LDM U-Net state dict")
    layers = _infer_ldm_layers_per_block(list(unet))
    return {unet_key_from_ldm(k, layers): v for k, v in unet.items()}


# ------------------------------------------------------------------------------------------------ VAE

_VAE_TOP = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RE = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.(.+)")


def _vae_resnet(sub: str) -> str:
    return "nin_shortcut" + sub[len("conv_shortcut"):] if sub.startswith("conv_shortcut.") else sub


def _vae_attention(sub: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Mid attention: diffusers linears are 1x1 convs in LDM (``[C, C]`` -> ``[C, C, 1, 1]``)."""
    module, param = _split_param(sub)
    if module not in _VAE_ATTN:
        raise CheckpointMismatchError(f"unknown VAE attention parameter {sub!r}")
    if module != "group_norm" and param == "weight" and value.ndim == 2:
        value = value[:, :, None, None]
    return f"{_VAE_ATTN[module]}.{param}", value


def vae_key_to_ldm(key: str, value: torch.Tensor, num_blocks: int) -> tuple[str, torch.Tensor]:
    """LDM name and tensor (without ``first_stage_model.``) of one diffusers ``AutoencoderKL`` entry."""
    if key.split(".")[0] in {"quant_conv", "post_quant_conv"}:
        return key, value
    m = _VAE_RE.fullmatch(key)
    if m is None:
        side, _, rest = key.partition(".")
        module, param = _split_param(rest)
        if side in {"encoder", "decoder"} and module in _VAE_TOP:
            return f"{side}.{_VAE_TOP[module]}.{param}", value
        raise CheckpointMismatchError(f"VAE key {key!r} has no LDM equivalent (not an SD AutoencoderKL?)")
    side, part, rest = m.groups()
    if part == "mid_block":
        kind, index, sub = rest.split(".", 2)
        if kind == "resnets":
            return f"{side}.mid.block_{int(index) + 1}.{_vae_resnet(sub)}", value
        name, value = _vae_attention(sub, value)
        return f"{side}.mid.attn_{int(index) + 1}.{name}", value
    block, kind, sub = rest.split(".", 2)
    level = int(block) if part == "down_blocks" else num_blocks - 1 - int(block)  # LDM counts up-levels bottom-up
    ldm_side = "down" if part == "down_blocks" else "up"
    if kind == "resnets":
        return f"{side}.{ldm_side}.{level}.block.{_vae_resnet(sub)}", value
    sampler = "downsample" if kind == "downsamplers" else "upsample"
    return f"{side}.{ldm_side}.{level}.{sampler}.{sub.split('.', 1)[1]}", value


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
               prefix: str = LDM_VAE_PREFIX) -> StateDict:
    """Diffusers ``AutoencoderKL`` state dict -> LDM keys (``first_stage_model.*``)."""
    if config is not None:
        num_blocks = len(config["up_block_types"])
    else:
        num_blocks = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks."))
    out: StateDict = {}
    for key, value in state_dict.items():
        name, tensor = vae_key_to_ldm(key, value, num_blocks)
        out[prefix + name] = tensor
    return out


# ----------------------------------------------------------------------------------------- text encoder


def is_openclip_text_encoder(config: Any) -> bool:
    """SD 2.x text encoders are OpenCLIP models (plain GELU); SD 1.x uses OpenAI CLIP (QuickGELU)."""
    return getattr(config, "hidden_act", "quick_gelu") != "quick_gelu"


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Any = None,
                prefix: str = LDM_CLIP_PREFIX) -> StateDict:
    """Transformers ``CLIPTextModel`` state dict -> SD 1.x LDM keys (``cond_stage_model.transformer.text_model.*``).

    Works for both the nested (``text_model.*``) and the flat (transformers >= 5.6) module layout.
    ``position_ids`` is written as SD 1.x files carry it (old CLIP code loads it strictly).
    """
    if config is not None and is_openclip_text_encoder(config):
        raise UnsupportedConversionError(
            "SD 2.x text encoders use OpenCLIP's layout (cond_stage_model.model.*: fused q/k/v, 24 layers of which "
            "diffusers keeps 23) and cannot be written; convert only the U-Net (--to ldm-unet) for SD 2.x"
        )
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("text_projection."):
            raise UnsupportedConversionError("CLIPTextModelWithProjection has no SD 1.x LDM equivalent")
        out[prefix + "text_model." + key.removeprefix("text_model.")] = value
    positions = prefix + "text_model.embeddings.position_embedding.weight"
    ids = prefix + "text_model.embeddings.position_ids"
    if positions in out and ids not in out:
        out[ids] = torch.arange(out[positions].shape[0], dtype=torch.int64)[None]
    return out


# ------------------------------------------------------------------------------------------- files


def is_ldm_unet_only_file(path: str | Path) -> bool:
    """Whether a ``.safetensors`` file holds LDM U-Net keys but no VAE / text encoder (header only).

    Lets a failed ``--model`` load say "this is a U-Net, pass it as --checkpoint".
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the caller
        return False
    return any(k.startswith(LDM_UNET_PREFIX) for k in keys) and not any(
        k.startswith(LDM_OTHER_MODEL_PREFIXES) for k in keys)


# ------------------------------------------------------------------------------------------- writers


def _contiguous(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _save(state: StateDict, path: str | Path, kind: str) -> Path:
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LDM files are written as .safetensors (pickled .ckpt is never written)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(state), str(path), metadata={"format": "pt", "layout": "ldm", "content": kind,
                                                        "written_by": "cleandift"})
    return path


def write_ldm_unet_file(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                        config: Mapping[str, Any] | None = None) -> Path:
    """Write a diffusers U-Net state dict as ``model.diffusion_model.*`` keys only (no module needed)."""
    return _save(unet_to_ldm(state_dict, config), path, "unet")


def student_to_ldm_unet_file(unet: nn.Module, path: str | Path) -> Path:
    """Write a (student) U-Net as ``model.diffusion_model.*`` keys only: what ODISE-based pipelines load."""
    config = getattr(unet, "config", None)
    return write_ldm_unet_file(unet.state_dict(), path, dict(config) if config is not None else None)


def backbone_to_ldm(backbone: Any, unet: nn.Module | None = None) -> StateDict:
    """Full SD 1.x LDM state dict of a backbone (U-Net, VAE, CLIP), optionally with another U-Net."""
    from .checkpoints import check_fits  # noqa: PLC0415

    missing = [part for part in ("unet", "vae", "text_encoder") if getattr(backbone, part, None) is None]
    if missing:
        raise CheckpointMismatchError(f"backbone {getattr(backbone, 'name', backbone)!r} is not a Stable Diffusion "
                                      f"model (no {', '.join(missing)}); only SD 1.x backbones can be written")
    text_encoder = backbone.text_encoder
    if is_openclip_text_encoder(text_encoder.config):  # fail before converting anything
        clip_to_ldm({}, text_encoder.config)
    if unet is not None:
        check_fits(backbone.unet, unet.state_dict(), "replacement U-Net")
    unet = unet if unet is not None else backbone.unet
    state = unet_to_ldm(unet.state_dict(), dict(unet.config))
    state.update(vae_to_ldm(backbone.vae.state_dict(), dict(backbone.vae.config)))
    state.update(clip_to_ldm(text_encoder.state_dict(), text_encoder.config))
    return state


def write_single_file(backbone: Any, path: str | Path, unet: nn.Module | None = None) -> Path:
    """Write a complete SD 1.x single-file ``.safetensors`` (LDM layout) of ``backbone``.

    ``unet`` replaces the backbone's U-Net (e.g. a CleanDIFT student); it must have the same keys and
    shapes. Load the file back with ``load_backbone(path, single_file_config=<diffusers folder>)``.
    """
    return _save(backbone_to_ldm(backbone, unet), path, "sd1-single-file")
