"""Class-conditional sampling from a pixel backbone (DDIM by default, DDPM optional), with CFG."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..backbones.pixel import PixelDiffusionBackbone


@torch.no_grad()
def sample_images(backbone: PixelDiffusionBackbone, labels: Sequence[int] | torch.Tensor, steps: int = 50,
                  guidance_scale: float = 2.0, sampler: Literal["ddim", "ddpm"] = "ddim",
                  generator: torch.Generator | None = None, chunk_size: int = 100,
                  scheduler_options: dict | None = None) -> torch.Tensor:
    """Images ``(N, C, R, R)`` in ``[-1, 1]`` for label ids (``null_id`` = unconditional).

    Classifier-free guidance mixes the conditional and null-token predictions:
    ``eps = eps_null + w * (eps_label - eps_null)`` (``w = 1`` turns it off). Noise comes from
    ``generator`` (CPU) so a seed reproduces a grid on any device. ``scheduler_options`` override the
    backbone's scheduler config for sampling only (e.g. ``{"clip_sample": True}``; see
    ``benchmarks/mini_guidance.py`` for why the pixel scheduler leaves it off).
    """
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.long)
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    scheduler = cls.from_config({**dict(backbone.scheduler.config), **(scheduler_options or {})})
    out = []
    for chunk in labels.split(chunk_size):
        out.append(_sample_chunk(backbone, scheduler, chunk, steps, guidance_scale, generator))
    return torch.cat(out)


def _sample_chunk(backbone: PixelDiffusionBackbone, scheduler: DDIMScheduler | DDPMScheduler,
                  labels: torch.Tensor, steps: int, guidance_scale: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    device, dtype = backbone.device, backbone.dtype
    n, c, r = len(labels), backbone.image_channels, backbone.resolution
    x = torch.randn((n, c, r, r), generator=generator).to(device=device, dtype=torch.float32)
    enc = backbone.label_encoder
    guided = guidance_scale != 1.0  # w = 1 is the conditional model alone: no null-token pass needed
    null = torch.full_like(labels, enc.null_id)
    cond = enc((torch.cat([labels, null]) if guided else labels).to(device)).to(dtype)
    copies = 2 if guided else 1
    scheduler.set_timesteps(steps)
    step_kwargs = {"generator": generator} if generator is not None else {}
    if isinstance(scheduler, DDIMScheduler):
        # If x0 is clipped, re-derive the noise from the clipped x0 (as GLIDE does): diffusers' default pairs
        # the clipped x0 with the unclipped noise, which broke guided samples (benchmarks/mini_guidance.py).
        step_kwargs["use_clipped_model_output"] = True
    for t in scheduler.timesteps:
        eps = backbone.unet(torch.cat([x] * copies).to(dtype), t.to(device).expand(copies * n),
                            encoder_hidden_states=cond, return_dict=False)[0].float()
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x.clamp(-1, 1)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """Tile ``(N, C, H, W)`` images in ``[-1, 1]`` into one uint8 ``(H', W', C)`` array (row-major)."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.float().cpu()):
        y, x = divmod(i, nrow)
        top, left = pad + y * (h + pad), pad + x * (w + pad)
        grid[:, top:top + h, left:left + w] = img
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
