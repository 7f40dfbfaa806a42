"""A tiny Flux.1 pipeline: ``FluxTransformer2DModel`` (double + single blocks), CLIP + T5, a shifted VAE.

The transformer is diffusers' own tiny test config with two blocks of each kind (so a tap can sit
before, between and after the kinds); the VAE has 4 latent channels, which 2x2 packing turns into the
transformer's 16 input channels, and a ``shift_factor`` like Flux's VAE. ``guidance_embeds=True`` is
FLUX.1-dev's layout (guidance-distilled, dynamic shift), ``False`` with ``use_dynamic_shifting=False``
FLUX.1-schnell's (no guidance embedding, unshifted sigmas).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import components

#: Transformer config (diffusers' tiny Flux test sizes; 4 latent channels x 2x2 packing = 16 inputs).
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=[4, 4, 8])

#: FLUX.1-dev's scheduler config (dynamic shift from the token count).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
#: FLUX.1-schnell's: no shift at all.
SCHNELL_SCHEDULER = {**SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

#: Flux's VAE normalisation constants (``vae/config.json`` of FLUX.1-dev / -schnell).
VAE_SCALING, VAE_SHIFT = 0.3611, 0.1159


def build(folder: str | Path, seed: int = 0, guidance_embeds: bool = True, use_dynamic_shifting: bool = True):
    """A ``FluxPipeline`` with random weights; ``folder`` receives its tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: PLC0415
    from diffusers import FluxTransformer2DModel  # noqa: PLC0415

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=guidance_embeds)
    scheduler = SCHEDULER if use_dynamic_shifting else SCHNELL_SCHEDULER
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=components.vae(latent_channels=4, seed=seed + 1, scaling_factor=VAE_SCALING,
                           shift_factor=VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=components.clip_text_encoder(32, seed=seed + 2),
        tokenizer=components.clip_tokenizer(folder / "tok1"),
        text_encoder_2=components.t5_encoder(32, seed=seed + 3),
        tokenizer_2=components.t5_tokenizer(folder / "tok2"),
        transformer=transformer)


def save(folder: str | Path, seed: int = 0, guidance_embeds: bool = True,
         use_dynamic_shifting: bool = True) -> Path:
    """Build and ``save_pretrained`` a tiny Flux pipeline folder; returns its path."""
    folder = Path(folder)
    pipe = build(folder / "_parts", seed, guidance_embeds, use_dynamic_shifting)
    pipe.save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"
