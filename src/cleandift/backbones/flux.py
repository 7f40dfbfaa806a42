"""Flux.1 (dev and schnell): CLIP pooled + T5 text, an MMDiT with double and single blocks, rectified flow.

Everything the transformer receives is computed by ``FluxPipeline``'s own methods (diffusers
``pipelines/flux/pipeline_flux.py``), so it matches what the pipeline's ``__call__`` feeds
``FluxTransformer2DModel`` for the same prompt and image size:

* ``encode_prompt(prompt, prompt_2=None, max_sequence_length=512)``: T5's 512-token last hidden
  states (no attention mask) -> ``encoder_hidden_states``; CLIP's ``pooler_output`` ->
  ``pooled_projections``; zero ``txt_ids`` (one ``(512, 3)`` set for the whole batch, as current
  diffusers takes them -- kept per row in the :class:`~.conditioning.Conditioning` and passed once).
  ``""`` and ``None`` are encoded exactly as the pipeline encodes ``""``.
* Latents: ``(z - shift_factor) * scaling_factor`` (:class:`~.latents.LatentBackbone`). The backbone's
  latents ``x`` stay **unpacked** ``(B, C, h, w)`` everywhere (``encode_images``, ``add_noise``,
  ensembles); only the denoiser call packs them: ``_pack_latents`` turns each 2x2 cell into one token of
  ``4 C`` channels, and ``_prepare_latent_image_ids`` gives the ids ``(0, row, col)`` of the ``h/2 x w/2``
  token grid.
* ``guidance``: ``guidance_scale`` (3.5, the pipeline's default) as a float32 ``(B,)`` tensor when
  ``transformer.config.guidance_embeds`` (FLUX.1-dev, guidance-distilled), ``None`` otherwise (schnell).
* Noise: :class:`~.noise.RectifiedFlow` with ``timestep_scale=1``: ``x_t = (1 - sigma) x0 + sigma eps``
  with ``sigma = time_shift(mu, 1, t / 1000)``, ``mu = calculate_shift(token count, ...)`` from the
  scheduler config -- what ``__call__`` passes to ``scheduler.set_timesteps(sigmas=..., mu=mu)``. The
  token count is that of the packed grid, ``(h/2)(w/2)``. The transformer gets ``sigma`` (the pipeline
  passes ``timestep / 1000``; the model multiplies timestep and guidance by 1000 itself). A scheduler
  without dynamic shifting (schnell: ``shift=1``) uses its static shift.

Taps ``block0`` ... ``block{N-1}``: the 19 double blocks (``transformer_blocks``), then the 38 single
blocks (``single_transformer_blocks``) of FLUX.1 -- 57 taps, each the block's image-token output
(the second stream of the ``(text, image)`` pair both kinds return in diffusers 0.42; older single
blocks return ``[text, image]`` concatenated, whose trailing image tokens are read instead), as a
``(B, 3072, h/2, w/2)`` map: channels ``inner_dim``, stride 2 latent cells per token. Images must be
multiples of ``2 * latent_factor`` px (16 px for Flux's 8x VAE).

Default tap ``block28`` (the 10th single block), DiTF's best Flux map (Gan et al., "Unleashing
Diffusion Transformers for Visual Correspondence by Modulating Massive Activations", NeurIPS'25:
block 28 of 57 at t = 260); models with fewer blocks default to their middle block. DiTF reads it after
two clean-ups that are **not** applied here (possible options later): the block output passed through
an affine-free LayerNorm and the block's AdaLN ``(1 + scale) x + shift`` modulation, and zeroing the
"massive activation" channels.
"""

from __future__ import annotations

import torch

from ..taps import TapTable, discover_block_taps
from .conditioning import HIDDEN_STATES, Conditioning
from .latents import LatentBackbone
from .noise import RectifiedFlow

#: Block lists in execution order with the index of their image stream in ``(text, image)``.
FLUX_BLOCKS = (("transformer_blocks", 1), ("single_transformer_blocks", 1))
#: DiTF's best FLUX.1 block (of 57; NeurIPS'25).
DITF_TAP = "block28"
#: ``FluxPipeline.__call__``'s default ``guidance_scale`` (the embedded guidance of FLUX.1-dev).
DEFAULT_GUIDANCE = 3.5
#: T5 tokens ``FluxPipeline.__call__`` encodes by default.
MAX_SEQUENCE_LENGTH = 512


def flux_taps(transformer) -> TapTable:
    """The ``block{i}`` tap table of a ``FluxTransformer2DModel`` (default :data:`DITF_TAP` if it exists)."""
    table = discover_block_taps(transformer, FLUX_BLOCKS, channels=int(transformer.inner_dim), stride=2)
    default = DITF_TAP if DITF_TAP in table else table.default[0]
    return TapTable(list(table), default=[default])


class FluxBackbone(LatentBackbone):
    """A ``FluxPipeline`` seen as a feature extractor.

    Args:
        pipe: a ``FluxPipeline`` (its text encoders may be ``None`` once released).
        resolution: default image size (default: the pipeline's ``default_sample_size * vae_scale_factor``,
            1024 px for FLUX.1).
        guidance_scale: embedded guidance given to guidance-distilled models (FLUX.1-dev; the
            pipeline's default 3.5); ignored by models without a guidance embedding (schnell).
        max_sequence_length: T5 tokens per prompt (the pipeline's default 512).
    """

    name = "flux"
    family = "flux"
    adaln_norms = {"transformer_blocks": "norm1", "single_transformer_blocks": "norm"}
    text_encoder_names = ("text_encoder", "text_encoder_2")
    default_feature_taps = (DITF_TAP,)

    def __init__(self, pipe, resolution: int | None = None, guidance_scale: float = DEFAULT_GUIDANCE,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, name: str | None = None) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

        resolution = resolution or int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # read, never stepped
        taps = flux_taps(pipe.transformer)
        super().__init__(pipe.transformer, pipe.vae, scheduler, resolution=resolution,
                         noise=RectifiedFlow(scheduler, timestep_scale=1.0), taps=taps)
        self.default_feature_taps = taps.default
        self.adopt_pipeline(pipe, name)
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)

    # ------------------------------------------------------------------ prompts
    def _encode_prompt_batch(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompts, prompt_2=None, device=self._text_device(),
                                                           max_sequence_length=self.max_sequence_length)
        return Conditioning({HIDDEN_STATES: embeds, "pooled_projections": pooled,
                             "txt_ids": text_ids.expand(len(prompts), -1, -1)})


    # ------------------------------------------------------------------ the denoiser
    @property
    def has_guidance(self) -> bool:
        """Whether the transformer embeds a guidance scale (FLUX.1-dev) or not (schnell)."""
        return bool(self.denoiser.config.guidance_embeds)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Packed token grid of unpacked latents ``x`` ``(B, C, h, w)``: one token per 2x2 cell."""
        return int(x.shape[-2]) // 2, int(x.shape[-1]) // 2

    def guidance(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """``guidance`` as ``FluxPipeline.__call__`` builds it (``None`` without a guidance embedding)."""
        if not self.has_guidance:
            return None
        return torch.full([1], self.guidance_scale, device=device, dtype=torch.float32).expand(batch_size)

    def denoiser_inputs(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> dict:
        """Pack ``x`` into 2x2 tokens and build the transformer's call; ``timestep`` is sigma ``(B,)``."""
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs 2x2 latent cells: latent sides must be even, got {h}x{w} "
                             f"(images must be multiples of {self.size_multiple} px)")
        packed = self.pipe._pack_latents(x.contiguous(), b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        return dict(hidden_states=packed, timestep=timestep, guidance=self.guidance(b, x.device),
                    pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond.hidden_states,
                    txt_ids=cond["txt_ids"][0], img_ids=img_ids)

    def describe(self) -> dict:
        return {**super().describe(), "guidance": self.guidance_scale if self.has_guidance else None,
                "max_sequence_length": self.max_sequence_length}


def load(source: str, *, dtype: torch.dtype = torch.float32, resolution: int | None = None,
         local_files_only: bool = False, variant: str | None = None,
         components: dict | None = None) -> FluxBackbone:
    """Load a Flux.1 diffusers folder or hub repo (every component through diffusers' own loader).

    ``components`` replaces pipeline components (e.g. ``{"transformer": ...}`` read from a single file).
    """
    from diffusers import FluxPipeline  # noqa: PLC0415

    pipe = FluxPipeline.from_pretrained(source, torch_dtype=dtype, local_files_only=local_files_only,
                                        variant=variant, **(components or {}))
    return FluxBackbone(pipe, resolution=resolution)

