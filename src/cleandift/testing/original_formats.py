"""Diffusers models written in their families' original single-file layouts: single-file loading, offline.

Each writer is the inverse of the diffusers converter that reads the layout back
(``diffusers.loaders.single_file_utils``), so a tiny diffusers model written here and loaded with
``from_single_file`` must come back bit for bit:

* :func:`flux_to_original` -- Black Forest Labs' Flux transformer (``double_blocks`` / ``single_blocks``,
  fused q/k/v and q/k/v/MLP inputs, (shift, scale) final modulation); read by
  ``convert_flux_transformer_checkpoint_to_diffusers`` (FLUX.1's width only) and by
  :func:`cleandift.backbones.single_file.flux_to_diffusers` (any width).
* :func:`sd3_to_original` -- Stability's MMDiT (``joint_blocks.{i}.x_block`` / ``context_block``, fused
  q/k/v, the last context block's (shift, scale) modulation), under ``model.diffusion_model.``; read by
  ``convert_sd3_transformer_checkpoint_to_diffusers``.
* :func:`sdxl_to_original` -- an SDXL checkpoint as ``sd_xl_base_1.0.safetensors`` lays it out: LDM U-Net
  (:func:`sdxl_unet_to_ldm`), LDM VAE, CLIP-L under ``conditioner.embedders.0.transformer.`` and
  OpenCLIP-G under ``conditioner.embedders.1.model.`` (:func:`openclip_to_ldm`); read by
  ``StableDiffusionXLPipeline.from_single_file``.

Tensors are shared with the model where no fusing or reordering is needed; :func:`save` makes them
contiguous copies.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..backbones.single_file import FLUX_FUSED, FLUX_RENAMES, FLUX_SWAPPED, PREFIX, _bfl_param, _swap_halves
from ..ldm_format import LDM_UNET_PREFIX, LDM_VAE_PREFIX, clip_to_ldm, unet_to_ldm, vae_to_ldm

StateDict = dict[str, torch.Tensor]

SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_G_PREFIX = "conditioner.embedders.1.model."


def _state(model) -> StateDict:
    return dict(model.state_dict()) if hasattr(model, "state_dict") else dict(model)


def _blocks(keys, name: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _check_used(state: StateDict, used: set[str], what: str) -> None:
    left = sorted(set(state) - used)
    if left:
        raise KeyError(f"{what}: {len(left)} diffusers keys have no original name, e.g. {left[:3]}")


# ------------------------------------------------------------------------------------------------ Flux


def flux_to_original(transformer, prefix: str = "") -> StateDict:
    """A ``FluxTransformer2DModel`` in BFL's layout (``flux1-dev.safetensors``, no prefix)."""
    state = _state(transformer)
    counts = {"double_blocks": _blocks(state, "transformer_blocks"),
              "single_blocks": _blocks(state, "single_transformer_blocks")}
    out: StateDict = {}
    used: set[str] = set()

    def indices(bfl_name):
        return [None] if "{i}" not in bfl_name else range(counts[bfl_name.split(".")[0]])

    for diffusers_name, bfl_name in FLUX_RENAMES:
        for i in indices(bfl_name):
            src, dst = diffusers_name.format(i=i), bfl_name.format(i=i)
            for param in ("weight", "bias"):
                if f"{src}.{param}" in state:
                    out[f"{prefix}{dst}.{_bfl_param(dst, param)}"] = state[f"{src}.{param}"]
                    used.add(f"{src}.{param}")
    for bfl_name, parts in FLUX_FUSED:
        for i in indices(bfl_name):
            for param in ("weight", "bias"):
                names = [f"{p.format(i=i)}.{param}" for p in parts]
                out[f"{prefix}{bfl_name.format(i=i)}.{param}"] = torch.cat([state[n] for n in names], dim=0)
                used.update(names)
    for diffusers_name, bfl_name in FLUX_SWAPPED:
        for param in ("weight", "bias"):
            out[f"{prefix}{bfl_name}.{param}"] = _swap_halves(state[f"{diffusers_name}.{param}"])
            used.add(f"{diffusers_name}.{param}")
    _check_used(state, used, "Flux transformer")
    return out


# ------------------------------------------------------------------------------------------------- SD3

_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
#: Block-local renames, diffusers -> ``joint_blocks.{i}.`` sub-name.
_SD3_BLOCK = {
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
_SD3_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def sd3_to_original(transformer, prefix: str = PREFIX) -> StateDict:
    """An ``SD3Transformer2DModel`` (or its state dict) in Stability's MMDiT layout (``sd3.5_medium``)."""
    state = _state(transformer)
    last = _blocks(state, "transformer_blocks") - 1
    out: StateDict = {}
    used: set[str] = set()
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if key == "pos_embed.pos_embed":  # a parameter of its own, not a module's weight
            out[prefix + "pos_embed"] = value
        elif module in _SD3_TOP:
            out[f"{prefix}{_SD3_TOP[module]}.{param}"] = value
        elif module == "norm_out.linear":
            out[f"{prefix}final_layer.adaLN_modulation.1.{param}"] = _swap_halves(value)
        elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)) and m.group(2) in _SD3_BLOCK:
            i, sub = int(m.group(1)), m.group(2)
            if sub == "norm1_context.linear" and i == last:  # the last context modulation is (shift, scale)
                value = _swap_halves(value)
            out[f"{prefix}joint_blocks.{i}.{_SD3_BLOCK[sub]}.{param}"] = value
        else:
            continue
        used.add(key)
    for i in range(last + 1):
        for fused, parts in _SD3_FUSED.items():
            for param in ("weight", "bias"):
                names = [f"transformer_blocks.{i}.{p}.{param}" for p in parts]
                if names[0] in state:
                    fused_tensor = torch.cat([state[n] for n in names], dim=0)
                    out[f"{prefix}joint_blocks.{i}.{fused}.{param}"] = fused_tensor
                    used.update(names)
    _check_used(state, used, "SD3 transformer")
    return out


# ------------------------------------------------------------------------------------------------ SDXL

_SDXL_ADD_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sdxl_unet_to_ldm(unet, prefix: str = LDM_UNET_PREFIX) -> StateDict:
    """An SDXL ``UNet2DConditionModel`` in the LDM layout: SD's U-Net names plus ``label_emb.0.{0,2}``.

    Deeper transformers (``transformer_layers_per_block`` > 1) keep their ``transformer_blocks.{j}``
    names in both layouts, so :func:`cleandift.ldm_format.unet_to_ldm` writes everything but the added
    text/time embedding, whose two linears become ``label_emb.0.0`` / ``label_emb.0.2``.
    """
    state = _state(unet)
    added = {k: v for k, v in state.items() if k.startswith("add_embedding.")}
    out = unet_to_ldm({k: v for k, v in state.items() if k not in added}, None, prefix=prefix)
    for key, value in added.items():
        module, _, param = key.rpartition(".")
        out[f"{prefix}{_SDXL_ADD_EMBEDDING[module]}.{param}"] = value
    return out


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def openclip_to_ldm(text_encoder, prefix: str = SDXL_OPENCLIP_G_PREFIX) -> StateDict:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP's layout (SDXL's second encoder,
    ``conditioner.embedders.1.model.*``).

    q/k/v fuse into ``attn.in_proj_*``; the projection is stored transposed (``x @ text_projection``).
    """
    state = {k.removeprefix("text_model."): v for k, v in _state(text_encoder).items()
             if not k.endswith("position_ids")}
    out: StateDict = {}
    for key, value in state.items():
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, module, param = m.groups()
            base = f"{prefix}transformer.resblocks.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module.endswith("q_proj"):
                    parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    out[f"{base}attn.in_proj_{param}"] = torch.cat(parts, dim=0)
            else:
                out[f"{base}{_OPENCLIP_LAYER[module]}.{param}"] = value
        else:
            raise KeyError(f"OpenCLIP text encoder: no original name for {key!r}")
    return out


def sdxl_to_original(pipe, text_encoders: bool = True) -> StateDict:
    """An SDXL pipeline as one LDM-layout state dict (U-Net + VAE, and both text encoders unless told not)."""
    out = sdxl_unet_to_ldm(pipe.unet)
    out.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config), prefix=LDM_VAE_PREFIX))
    if text_encoders:
        out.update(clip_to_ldm(pipe.text_encoder.state_dict(), None, prefix=SDXL_CLIP_L_PREFIX))
        out.update(openclip_to_ldm(pipe.text_encoder_2))
    return out


# ------------------------------------------------------------------------------------------------ files


def save(state: StateDict, path: str | Path) -> Path:
    """Write ``state`` as a ``.safetensors`` file (contiguous CPU copies)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(path))
    return path
