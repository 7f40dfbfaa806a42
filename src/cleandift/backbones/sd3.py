"""SD3 / SD3.5: CLIP-L + CLIP-G + T5 prompts, an MMDiT (``SD3Transformer2DModel``), statically shifted flow.

Everything the denoiser receives is computed by ``StableDiffusion3Pipeline``'s own methods or matches
its ``__call__`` line for line (diffusers 0.42, ``pipeline_stable_diffusion_3.py``):

* Prompts -- ``encode_prompt(prompt, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
  max_sequence_length=256)``: CLIP-L and CLIP-G second-to-last hidden states joined on the feature axis
  and zero-padded to T5's width, then joined along the sequence with T5's 256 tokens (77 + 256 = 333,
  no T5 mask) -> ``encoder_hidden_states``; both CLIPs' pooled projections joined ->
  ``pooled_projections``. Without T5 (``text_encoder_3`` absent) the pipeline feeds zeros in place of
  T5's tokens (``_get_t5_prompt_embeds``); :func:`load` ``(text_encoder_3=False)`` does the same, and a
  folder saved without T5 loads that way by itself. ``""`` is encoded like any prompt.
* Latents -- ``(z - shift_factor) * scaling_factor`` (:class:`~.latents.LatentBackbone`).
* Noise -- :class:`~.noise.RectifiedFlow`: ``x_t = (1 - sigma) x0 + sigma eps`` with SD3's static shift
  ``sigma = s * u / (1 + (s - 1) * u)``, ``u = t / 1000``, ``s = scheduler.config.shift`` (3.0), the
  formula of ``FlowMatchEulerDiscreteScheduler`` (``__init__`` / ``set_timesteps``), and the noising of
  its ``scale_noise``. The transformer receives ``timestep = sigma * 1000`` (the pipeline passes
  ``scheduler.timesteps``, which are ``sigmas * num_train_timesteps``).
* Taps -- ``block0`` ... ``block{N-1}``: the image stream (second element) of each
  ``transformer_blocks[i]`` output ``(encoder_hidden_states, hidden_states)`` (the last block's text
  output is ``None``), ``inner_dim`` channels on the token grid of ``patch_size`` latent cells
  (SD3-medium / 3.5-medium: 24 blocks, 1536 ch; 3.5-large: 38 blocks, 2432 ch; stride 2). Default
  feature tap: the middle block (``block12`` of 24). No peer reports a best SD3 map yet: this is a
  starting point to sweep, not a tuned choice.
* Size -- image sides are multiples of ``latent_factor * patch_size`` (16 px) and at most
  ``pos_embed_max_size * patch_size * latent_factor`` px (the positional-embedding crop of ``PatchEmbed``).
"""

from __future__ import annotations

import torch

from ..taps import discover_block_taps
from .conditioning import HIDDEN_STATES, Conditioning
from .latents import LatentBackbone
from .noise import RectifiedFlow

#: T5 tokens the pipeline encodes by default (``encode_prompt(max_sequence_length=256)``).
MAX_SEQUENCE_LENGTH = 256
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class StableDiffusion3Backbone(LatentBackbone):
    """An SD3 / SD3.5 pipeline seen as a feature extractor.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (``text_encoder_3`` may be ``None``: zeros replace T5).
        resolution: default image size (1024 for SD3 / 3.5); default ``transformer.config.sample_size``
            latent cells times the VAE factor.
        max_sequence_length: T5 tokens per prompt (the pipeline's default 256).
    """

    name = "sd3"
    family = "sd3"
    adaln_norms = {"transformer_blocks": "norm1"}
    text_encoder_names = _TEXT_ENCODERS

    def __init__(self, pipe, resolution: int | None = None, name: str | None = None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> None:
        transformer, scheduler = pipe.transformer, pipe.scheduler
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        resolution = resolution or int(transformer.config.sample_size) * vae_factor
        patch = int(transformer.config.patch_size)
        taps = discover_block_taps(transformer, [("transformer_blocks", 1)], channels=transformer.inner_dim,
                                   stride=patch)
        noise = RectifiedFlow(scheduler, timestep_scale=int(scheduler.config.num_train_timesteps))
        super().__init__(transformer, pipe.vae, scheduler, resolution=resolution, noise=noise, taps=taps)
        self.patch_size = patch
        self.default_feature_taps = tuple(self.taps.default)
        self.max_sequence_length = int(max_sequence_length)
        self.adopt_pipeline(pipe, name)

    @property
    def has_t5(self) -> bool:
        """Whether prompts go through T5 (``False``: zeros in place of its tokens, as the pipeline does)."""
        return self.pipe.text_encoder_3 is not None

    # ------------------------------------------------------------------ prompts

    def _encode_prompt_batch(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, prompt_2=None, prompt_3=None, device=self._text_device(), num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return Conditioning({HIDDEN_STATES: embeds, "pooled_projections": pooled})


    # ------------------------------------------------------------------ the denoiser
    @property
    def max_image_size(self) -> int | None:
        """Largest image side in pixels the positional embedding covers (``None``: no limit)."""
        max_patches = self.denoiser.config.pos_embed_max_size
        return None if max_patches is None else int(max_patches) * self.patch_size * self.latent_factor

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Patches per side of latents ``x``: the grid the block taps are unpatchified onto."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def denoiser_inputs(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> dict:
        """The pipeline's transformer call: latents, ``sigma * 1000``, joint text, pooled projections."""
        self._check_size(x)
        return dict(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.hidden_states,
                    pooled_projections=cond["pooled_projections"])

    def _check_size(self, x: torch.Tensor) -> None:
        """Refuse latents the positional embedding cannot cover, in pixels (diffusers reports patches)."""
        limit = self.max_image_size
        h, w = (int(s) * self.latent_factor for s in x.shape[-2:])
        if limit is not None and max(h, w) > limit:
            raise ValueError(f"image size {h}x{w} exceeds this SD3 model's largest side of {limit} px "
                             f"(pos_embed_max_size={self.denoiser.config.pos_embed_max_size} patches of "
                             f"{self.patch_size * self.latent_factor} px); resize the images or pass --size")

    def describe(self) -> dict:
        return {**super().describe(), "patch_size": self.patch_size, "t5": self.has_t5,
                "max_sequence_length": self.max_sequence_length}


def load(source: str, *, dtype: torch.dtype = torch.float32, resolution: int | None = None,
         local_files_only: bool = False, variant: str | None = None, text_encoder_3: bool = True,
         max_sequence_length: int = MAX_SEQUENCE_LENGTH,
         components: dict | None = None) -> StableDiffusion3Backbone:
    """Load an SD3 / SD3.5 diffusers folder or hub repo (every component through diffusers' own loader).

    ``text_encoder_3=False`` skips T5 (4.7 B parameters): prompts then get zeros in place of its
    tokens, exactly as the pipeline does without it. A folder saved without T5 (``model_index.json``
    lists ``text_encoder_3: [null, null]``) loads that way by itself. ``components`` replaces pipeline
    components (e.g. ``{"transformer": ...}`` read from a single file).
    """
    from diffusers import StableDiffusion3Pipeline  # noqa: PLC0415

    kwargs = {}
    if not text_encoder_3 or not _lists_t5(StableDiffusion3Pipeline, source, local_files_only):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    kwargs.update(components or {})
    pipe = StableDiffusion3Pipeline.from_pretrained(source, torch_dtype=dtype, variant=variant,
                                                    local_files_only=local_files_only, **kwargs)
    return StableDiffusion3Backbone(pipe, resolution=resolution, max_sequence_length=max_sequence_length)



def _lists_t5(pipeline_class, source: str, local_files_only: bool) -> bool:
    """Whether the folder's / repo's ``model_index.json`` names a T5 encoder (diffusers refuses null ones)."""
    index = pipeline_class.load_config(source, local_files_only=local_files_only)
    entry = index.get("text_encoder_3") or [None, None]
    return entry[0] is not None and entry[-1] is not None
