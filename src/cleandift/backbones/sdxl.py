"""SDXL (and SDXL-Turbo): two CLIP text encoders, a U-Net with added text/time conditioning, DDPM noise.

Everything the denoiser receives is computed by ``StableDiffusionXLPipeline``'s own methods, so it
matches what the pipeline feeds the U-Net for the same prompt and image size:

* ``encode_prompt``: both encoders' second-to-last hidden states joined on the feature axis
  (``encoder_hidden_states``) and ``text_encoder_2``'s pooled projection (``text_embeds``). The empty
  prompt is encoded like any prompt -- ``force_zeros_for_empty_prompt`` only zeroes the *negative*
  branch of classifier-free guidance, which feature extraction never runs.
* ``_get_add_time_ids``: ``time_ids`` = original size + crop ``(0, 0)`` + target size, all equal to
  the model input's pixel size (what a text-to-image call of that size uses).

Taps: the generic U-Net table (:func:`~cleandift.taps.discover_taps`) -- SDXL has 3 up levels, so
``us1``-``us9``. Default ``us2``: 1280 channels at stride 4 of the latent (DistillDIFT's SDXL map:
1280 ch, 24x24 for 768 px input). Noise: variance-preserving on the model's own ``alphas_cumprod``.
"""

from __future__ import annotations

import torch

from .conditioning import HIDDEN_STATES, Conditioning
from .latents import LatentBackbone



class StableDiffusionXLBackbone(LatentBackbone):
    """An SDXL pipeline seen as a feature extractor.

    Args:
        pipe: a ``StableDiffusionXLPipeline`` (its text encoders may be ``None`` once released).
        resolution: default image size (1024 for SDXL, 512 for SDXL-Turbo); default from the U-Net.
    """

    name = "sdxl"
    family = "sdxl"
    default_feature_taps = ("us2",)
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe, resolution: int | None = None, name: str | None = None) -> None:
        from diffusers import DDPMScheduler  # noqa: PLC0415

        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        resolution = resolution or int(pipe.unet.config.sample_size) * vae_factor
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe.unet, pipe.vae, scheduler, resolution=resolution)
        self.adopt_pipeline(pipe, name)

    def _encode_prompt_batch(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self._text_device(),
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning({HIDDEN_STATES: embeds, "text_embeds": pooled})

    def time_ids(self, height: int, width: int, pooled_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """``(1, 6)`` added time ids of a ``height x width`` px image, as the pipeline builds them."""
        size = (int(height), int(width))
        return self.pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=pooled_dim)

    def denoiser_inputs(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> dict:
        pooled = cond["text_embeds"]
        h, w = x.shape[-2] * self.latent_factor, x.shape[-1] * self.latent_factor
        time_ids = self.time_ids(h, w, int(pooled.shape[-1]), pooled.dtype).to(x.device).expand(x.shape[0], -1)
        return dict(sample=x, timestep=timestep, encoder_hidden_states=cond.hidden_states,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})



def load(source: str, *, dtype: torch.dtype = torch.float32, resolution: int | None = None,
         local_files_only: bool = False, variant: str | None = None) -> StableDiffusionXLBackbone:
    """Load an SDXL diffusers folder or hub repo (every component through diffusers' own loader)."""
    from diffusers import StableDiffusionXLPipeline  # noqa: PLC0415

    pipe = StableDiffusionXLPipeline.from_pretrained(source, torch_dtype=dtype, local_files_only=local_files_only,
                                                     variant=variant, add_watermarker=False)
    return StableDiffusionXLBackbone(pipe, resolution=resolution)
