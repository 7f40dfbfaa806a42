"""Latent Stable Diffusion (1.x / 2.x) as a :class:`~cleandift.backbones.base.DiffusionBackbone`."""

from __future__ import annotations

import torch
from torch import nn

from .latents import LatentBackbone, nbytes


class StableDiffusionBackbone(LatentBackbone):
    """VAE + CLIP text encoder + U-Net + noise schedule of a latent diffusion model.

    Args:
        unet: ``UNet2DConditionModel``.
        vae: ``AutoencoderKL``; latents are ``encode(x) * vae.config.scaling_factor``.
        text_encoder: ``CLIPTextModel`` (its last hidden state conditions the U-Net, as in SD pipelines).
        tokenizer: ``CLIPTokenizer`` (padded / truncated to ``model_max_length``, 77 for SD).
        scheduler: any diffusers scheduler with the model's training betas.
        resolution: default image size (512 for SD 1.5, 768 for SD 2.1).
    """

    name = "stable-diffusion"
    family = "stable-diffusion"

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
                 resolution: int = 512, name: str | None = None) -> None:
        super().__init__(unet, vae, scheduler, resolution=resolution)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        if name:
            self.name = name
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()

    def _drop_prompt_encoder(self) -> int:
        freed = nbytes(self.text_encoder)
        self.text_encoder = None
        return freed

    def _encode_prompt_batch(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0]


def load(source: str, *, dtype: torch.dtype = torch.float32, resolution: int | None = None,
         local_files_only: bool = False, variant: str | None = None) -> StableDiffusionBackbone:
    """Load an SD 1.x / 2.x diffusers folder or hub repo (the family registry's entry point)."""
    from .loading import _load_pipeline_folder  # noqa: PLC0415 - loading imports this module

    return _load_pipeline_folder(source, dtype, resolution, local_files_only, variant)
