"""A tiny SDXL pipeline: SDXL's 3-level U-Net with ``text_time`` added conditioning, two CLIP encoders."""

from __future__ import annotations

from pathlib import Path

import torch

from . import components

#: U-Net config with SDXL's layout (plain down level, two cross-attention levels, deeper transformers
#: at the bottom; ``addition_embed_type="text_time"``) at toy width.
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
    cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16,
)

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, timestep_spacing="leading")


def build(folder: str | Path, seed: int = 0):
    """A ``StableDiffusionXLPipeline`` with random weights; ``folder`` receives its tokenizers."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: PLC0415

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    return StableDiffusionXLPipeline(
        vae=components.vae(seed=seed + 1, scaling_factor=0.13025), unet=unet,
        text_encoder=components.clip_text_encoder(32, seed=seed + 2),
        text_encoder_2=components.clip_text_encoder(32, projection_dim=32, with_projection=True, seed=seed + 3),
        tokenizer=components.clip_tokenizer(folder / "tok1"), tokenizer_2=components.clip_tokenizer(folder / "tok2"),
        scheduler=EulerDiscreteScheduler(**SCHEDULER), add_watermarker=False)


def save(folder: str | Path, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a tiny SDXL pipeline folder; returns its path."""
    folder = Path(folder)
    build(folder / "_parts", seed).save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"
