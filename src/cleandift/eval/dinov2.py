"""DINOv2 patch features through ``transformers``, with the SD-DINO / TLFR protocol pinned down.

The protocol both fusion baselines use (anchors §4-§5): DINOv2 ViT-B/14, images resized to
**840 px** (→ 60 x 60 patches of 14 px), ImageNet mean/std normalisation, the output of transformer
block **11** (0-based, i.e. the last block of ViT-B, *before* the final LayerNorm), facet ``token``,
CLS token dropped. Issue D4 (GeoAware-SC #22) is about exactly these choices drifting, so they are
explicit arguments here, and a test pins them against ``output_hidden_states``.

Layer numbering: ``layer=k`` is the output of block ``k`` counting from 0 -- what
``dino-vit-features`` (used by SD-DINO) calls layer ``k``. In transformers' terms it is
``hidden_states[k + 1]`` (``hidden_states[0]`` is the patch embedding). Negative ``k`` counts from
the end (``-1`` = last block).

Features are read with a forward hook and the model stops right after the chosen layer, so nothing
depends on how a transformers version returns hidden states.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneNotFoundError

DEFAULT_DINOV2 = "facebook/dinov2-base"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: SD-DINO / TLFR: 840 px input, stride 14 → 60 x 60 patches.
SD_DINO_IMAGE_SIZE = 840
SD_DINO_LAYER = 11

Facet = Literal["token", "key", "query", "value"]
FACETS: tuple[str, ...] = ("token", "key", "query", "value")
_FACET_MODULES = {"key": "k_proj", "query": "q_proj", "value": "v_proj"}


class _StopForward(Exception):
    """Raised by the hook once the requested layer has run (skips the remaining blocks)."""


class Dinov2Features(nn.Module):
    """Dense DINOv2 patch features ``(B, C, h, w)`` for images in ``[-1, 1]``.

    Args:
        model: a ``transformers`` ``Dinov2Model`` (any size; moved by the caller).
        image_size: side the images are resized to (bilinear, antialiased) before the ViT; must be a
            multiple of the patch size. ``None`` keeps the input size (it must then be a multiple).
        layer: block index, 0-based (SD-DINO "layer 11" = ``hidden_states[12]`` of ViT-B).
        facet: ``token`` (block output) or ``key`` / ``query`` / ``value`` (the attention
            projections of that block, heads concatenated -- dino-vit-features' other facets).
        final_norm: apply the model's final LayerNorm to ``token`` features (transformers'
            ``last_hidden_state`` convention); SD-DINO does not.
    """

    def __init__(self, model: nn.Module, image_size: int | None = SD_DINO_IMAGE_SIZE, layer: int = SD_DINO_LAYER,
                 facet: Facet = "token", final_norm: bool = False) -> None:
        super().__init__()
        if facet not in FACETS:
            raise ValueError(f"facet must be one of {', '.join(FACETS)}, got {facet!r}")
        self.model = model.eval()
        self.patch_size = int(model.config.patch_size)
        if image_size is not None and image_size % self.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {self.patch_size}")
        self.image_size = image_size
        num_layers = int(model.config.num_hidden_layers)
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layer {layer} out of range for a {num_layers}-block DINOv2")
        self.layer = layer % num_layers
        self.facet = facet
        self.final_norm = final_norm
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def grid_size(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for an input of ``image_size`` (or the configured size)."""
        if self.image_size is not None:
            return self.image_size // self.patch_size, self.image_size // self.patch_size
        if image_size is None:
            raise ValueError("image_size is needed when the extractor keeps the input size")
        return image_size[0] // self.patch_size, image_size[1] // self.patch_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images → resized, ImageNet-normalised pixel values in the model's dtype."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = ((x + 1.0) / 2.0 - self.mean) / self.std
        return x.to(self.dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, C, h, w)`` (float32) of images ``(B, 3, H, W)`` in ``[-1, 1]``."""
        pixels = self.preprocess(images)
        tokens = self._run_to_layer(pixels)
        if self.facet == "token" and self.final_norm:
            tokens = self.model.layernorm(tokens)
        patches = tokens[:, self.num_prefix_tokens:, :].float()
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)

    def _run_to_layer(self, pixels: torch.Tensor) -> torch.Tensor:
        block = self.model.encoder.layer[self.layer]
        target = block if self.facet == "token" else getattr(block.attention, _FACET_MODULES[self.facet])
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _StopForward

        handle = target.register_forward_hook(hook)
        try:
            self.model(pixel_values=pixels)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:  # pragma: no cover - a model whose forward bypasses encoder.layer
            raise RuntimeError("the DINOv2 forward pass never reached the requested layer")
        return captured[0]

    def describe(self) -> dict:
        """The protocol, recorded next to results (issue D4)."""
        return {"dino_model": getattr(self.model.config, "_name_or_path", "") or "dinov2",
                "dino_image_size": self.image_size, "dino_patch_size": self.patch_size, "dino_layer": self.layer,
                "dino_facet": self.facet, "dino_final_norm": self.final_norm}


def load_dinov2(model: str = DEFAULT_DINOV2, *, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, image_size: int | None = SD_DINO_IMAGE_SIZE,
                layer: int = SD_DINO_LAYER, facet: Facet = "token", final_norm: bool = False,
                local_files_only: bool | None = None) -> Dinov2Features:
    """Load a DINOv2 model (local folder or hub id) as a :class:`Dinov2Features` extractor.

    Args:
        model: a folder written by ``save_pretrained`` or a hub id (default ``facebook/dinov2-base``,
            ViT-B/14 as in SD-DINO / TLFR).
        device, dtype: where and in which precision the ViT runs (default CPU / float32).
        image_size, layer, facet, final_norm: see :class:`Dinov2Features` (defaults: SD-DINO).
        local_files_only: never touch the network (default: ``HF_HUB_OFFLINE``).
    """
    from transformers import Dinov2Model  # noqa: PLC0415

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
    try:
        # Cast after loading: the dtype keyword was renamed across transformers 4.x / 5.x.
        vit = Dinov2Model.from_pretrained(str(model), local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        where = "offline (local_files_only)" if local_files_only else "from the hub"
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise BackboneNotFoundError(
            f"could not load DINOv2 {model!r} {where}: {type(exc).__name__}: {reason} -- pass a folder written by "
            f"Dinov2Model.save_pretrained (e.g. --dino /path/to/dinov2-base), or fetch {DEFAULT_DINOV2} once "
            "with network access"
        ) from exc
    vit = vit.to(device=device or "cpu", dtype=dtype)
    return Dinov2Features(vit, image_size=image_size, layer=layer, facet=facet, final_norm=final_norm).to(
        device=device or "cpu")
