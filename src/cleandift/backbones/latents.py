"""Latent families: the VAE that maps images to the denoiser's latent space, with each family's normalisation.

Families normalise VAE latents differently (read in the diffusers pipelines' ``prepare_latents``):

* SD 1.x/2.x, PixArt: ``z * scaling_factor``;
* SDXL VAEs with ``latents_mean`` / ``latents_std`` in their config: ``(z - mean) * scaling_factor / std``;
* SD3, Flux: ``(z - shift_factor) * scaling_factor``.

All are affine in ``z``, so the posterior's mean and std map through them exactly and an ensemble can
encode an image once and still draw a posterior sample per member.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import DiffusionBackbone


class LatentBackbone(DiffusionBackbone):
    """A :class:`DiffusionBackbone` whose images go through ``vae`` (an ``AutoencoderKL``)."""

    def __init__(self, denoiser: nn.Module, vae: nn.Module, scheduler, resolution: int, **kwargs) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(denoiser, scheduler, resolution=resolution, latent_factor=factor, image_channels=3, **kwargs)
        self.vae = vae

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def _latent_affine(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``(shift, scale)`` with ``latent = (z - shift) * scale``, per channel where the VAE says so."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=like.device, dtype=like.dtype).view(view)
            std = torch.tensor(std, device=like.device, dtype=like.dtype).view(view)
            return mean, self.scaling_factor / std
        shift = getattr(cfg, "shift_factor", None)
        return (float(shift) if shift is not None else 0.0), self.scaling_factor

    def _posterior(self, images: torch.Tensor):
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(images.to(device=self.device, dtype=vae_dtype)).latent_dist

    @torch.no_grad()
    def image_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self._posterior(images)
        shift, scale = self._latent_affine(dist.mean)
        mean = dist.mean * scale if isinstance(shift, float) and shift == 0.0 else (dist.mean - shift) * scale
        return mean, dist.std * scale

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample_posterior: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = self.image_moments(images)
        if not sample_posterior:
            return mean.to(self.dtype)
        eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device,
                          dtype=mean.dtype).to(mean.device)
        return (mean + std * eps).to(self.dtype)

    #: the pipeline attributes holding this family's text encoders (adopted, frozen and released together)
    text_encoder_names: tuple[str, ...] = ()

    def adopt_pipeline(self, pipe, name: str | None = None) -> None:
        """Keep the family's diffusers pipeline (its methods build the denoiser's inputs) and its text encoders.

        Every weight is frozen and in eval mode: a backbone is the frozen model; students are copies.
        """
        self.pipe = pipe
        if name:
            self.name = name
        for attr in self.text_encoder_names:
            setattr(self, attr, getattr(pipe, attr, None))
        for module in (self.denoiser, self.vae, *(getattr(self, a) for a in self.text_encoder_names)):
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    def _text_device(self) -> torch.device:
        """Where the (first remaining) text encoder lives: prompts are tokenised onto it."""
        encoders = (getattr(self, attr, None) for attr in self.text_encoder_names)
        return next(next(e for e in encoders if e is not None).parameters()).device

    def enable_model_offload(self, device: torch.device | str) -> None:
        """diffusers' model CPU offload on the family pipeline: each model moves to ``device`` when it runs.

        Inputs may stay where they are: the offload hooks move them to ``device`` with the model, and the
        features come back on ``device``. Distillation does not support it (the student is a trained copy).
        """
        pipe = getattr(self, "pipe", None)
        if pipe is None:
            super().enable_model_offload(device)
        pipe.enable_model_cpu_offload(device=torch.device(device))
        self.offload_device = torch.device(device)

    def _drop_prompt_encoder(self) -> int:
        freed = sum(nbytes(getattr(self, attr, None)) for attr in self.text_encoder_names)
        for attr in self.text_encoder_names:
            setattr(self, attr, None)
            setattr(self.pipe, attr, None)
        return freed

    def release_decoder(self) -> int:
        freed = nbytes(self.vae.decoder) + nbytes(getattr(self.vae, "post_quant_conv", None))
        self.vae.decoder = None
        self.vae.post_quant_conv = None
        return freed

    def release_encoder(self) -> int:
        freed = nbytes(self.vae.encoder) + nbytes(getattr(self.vae, "quant_conv", None))
        # a weightless stand-in: `vae.encode` then fails with a clear message, and the VAE still reports its dtype
        self.vae.encoder = _ReleasedEncoder(next(self.vae.encoder.parameters()))
        self.vae.quant_conv = None
        return freed

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)


class _ReleasedEncoder(nn.Module):
    """Stands in for a VAE encoder freed by :meth:`LatentBackbone.release_encoder`."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.dtype_marker = nn.Parameter(like.new_empty(0), requires_grad=False)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the VAE encoder was released after caching the training latents (cache_latents); "
                           "load the backbone again to encode images")


def nbytes(module: nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (0 for ``None``)."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
