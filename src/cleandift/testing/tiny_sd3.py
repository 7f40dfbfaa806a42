"""A tiny SD3 / SD3.5 pipeline: an MMDiT (``SD3Transformer2DModel``), CLIP-L + CLIP-G + T5, flow matching.

Sizes follow diffusers' ``tests/pipelines/stable_diffusion_3`` tiny config, with two changes that keep
SD3's conventions visible at toy size: the two CLIPs are narrower than T5 (16 + 32 = 48 < 64), so the
pipeline's zero-padding of the CLIP states to T5 width is real (as 768 + 1280 < 4096 in SD3), and
``patch_size=2`` so taps must be unpatchified. ``sd35=True`` gives the SD3.5 block variant
(``dual_attention_layers`` with ``SD35AdaLayerNormZeroX``, RMS q/k norm). The VAE has SD3's
``shift_factor`` and ``scaling_factor`` (values of the real SD3 VAE).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import components

#: The MMDiT at toy width: 4 joint blocks, 4 heads x 8 = 32 channels, patch 2, T5-width (64) context.
TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                   num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                   pooled_projection_dim=48, out_channels=4, pos_embed_max_size=24)
#: SD3.5's differences: dual attention in the first blocks, RMS-normalised queries and keys.
SD35 = dict(dual_attention_layers=(0, 1), qk_norm="rms_norm")
#: The real SD3 VAE's latent normalisation.
VAE = dict(shift_factor=0.0609, scaling_factor=1.5035)
#: SD3's scheduler config (``scheduler_config.json`` of stabilityai/stable-diffusion-3-medium-diffusers).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def build(folder: str | Path, seed: int = 0, t5: bool = True, sd35: bool = False):
    """A ``StableDiffusion3Pipeline`` with random weights; ``folder`` receives its tokenizers.

    ``t5=False`` leaves ``text_encoder_3`` / ``tokenizer_3`` out (the pipeline then feeds zeros in place
    of T5's tokens, what SD3 users do to save its 4.7 B parameters).
    """
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,  # noqa: PLC0415
                           StableDiffusion3Pipeline)

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TRANSFORMER, **(SD35 if sd35 else {}))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=components.vae(seed=seed + 1, **VAE),
        text_encoder=components.clip_text_encoder(16, projection_dim=16, with_projection=True, seed=seed + 2),
        text_encoder_2=components.clip_text_encoder(32, projection_dim=32, with_projection=True,
                                                    seed=seed + 3),
        text_encoder_3=components.t5_encoder(64, seed=seed + 4) if t5 else None,
        tokenizer=components.clip_tokenizer(folder / "tok1"),
        tokenizer_2=components.clip_tokenizer(folder / "tok2"),
        tokenizer_3=components.t5_tokenizer(folder / "tok3") if t5 else None)


def save(folder: str | Path, seed: int = 0, t5: bool = True, sd35: bool = False) -> Path:
    """Build and ``save_pretrained`` a tiny SD3 pipeline folder; returns its path."""
    folder = Path(folder)
    build(folder / "_parts", seed, t5=t5, sd35=sd35).save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"
