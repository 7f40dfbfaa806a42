"""Latent Stable Diffusion (1.x / 2.x) as a :class:`~cleandift.backbones.base.DiffusionBackbone`."""

from __future__ import annotations

import torch
from torch import nn

from .base import DiffusionBackbone


class StableDiffusionBackbone(DiffusionBackbone):
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

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
                 resolution: int = 512, name: str | None = None) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(unet, scheduler, resolution=resolution, latent_factor=factor, image_channels=3)
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        if name:
            self.name = name
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def _posterior(self, images: torch.Tensor):
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(images.to(device=self.device, dtype=vae_dtype)).latent_dist

    @torch.no_grad()
    def image_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self._posterior(images)
        return dist.mean * self.scaling_factor, dist.std * self.scaling_factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample_posterior: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = self.image_moments(images)
        if not sample_posterior:
            return mean.to(self.dtype)
        eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device,
                          dtype=mean.dtype).to(mean.device)
        return (mean + std * eps).to(self.dtype)

    def _drop_prompt_encoder(self) -> int:
        freed = _nbytes(self.text_encoder)
        self.text_encoder = None
        return freed

    def release_decoder(self) -> int:
        freed = _nbytes(self.vae.decoder) + _nbytes(self.vae.post_quant_conv)
        self.vae.decoder = None
        self.vae.post_quant_conv = None
        return freed

    def _encode_prompt_batch(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0]


def _nbytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
