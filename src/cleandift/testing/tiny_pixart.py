"""A tiny PixArt pipeline: ``PixArtTransformer2DModel`` (adaLN-single DiT, learned sigma), a T5 encoder.

The transformer follows diffusers' own tiny PixArt-Sigma test config with 4 blocks instead of 2, so
the tap table has a middle. ``sample_size=128`` gives the Alpha-1024 layout whose transformer embeds
the image resolution and aspect ratio (its positional table is still tiny: 64 x 64 x 24).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import components

#: diffusers ``tests/pipelines/pixart_sigma`` tiny transformer, 4 layers.
TRANSFORMER = dict(
    sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3,
    caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
)

#: The released PixArt schedulers: DPM-Solver++ on linear betas 1e-4 .. 0.02, epsilon prediction.
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, steps_offset=0,
                 timestep_spacing="linspace")


def build(folder: str | Path, seed: int = 0, *, alpha: bool = False, **transformer):
    """A ``PixArtSigmaPipeline`` (``alpha``: ``PixArtAlphaPipeline``) with random weights.

    ``folder`` receives the tokenizer; ``transformer`` overrides :data:`TRANSFORMER` entries
    (e.g. ``sample_size=128`` for the resolution-conditioned Alpha layout, ``num_layers=12``).
    """
    from diffusers import (  # noqa: PLC0415
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**{**TRANSFORMER, **transformer})
    pipeline_class = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    return pipeline_class(
        tokenizer=components.t5_tokenizer(Path(folder) / "t5"),
        text_encoder=components.t5_encoder(d_model=TRANSFORMER["caption_channels"], seed=seed + 2),
        vae=components.vae(seed=seed + 1, scaling_factor=0.13025), transformer=model,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER))


def save(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build and ``save_pretrained`` a tiny PixArt pipeline folder (``kwargs``: see :func:`build`).

    Returns the folder's path.
    """
    folder = Path(folder)
    build(folder / "_parts", seed, **kwargs).save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"
