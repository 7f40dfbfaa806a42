"""PixArt-Sigma and PixArt-Alpha: a T5 text encoder, a DiT (``PixArtTransformer2DModel``), DDPM noise.

Everything the transformer receives is what ``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline.__call__``
give it for the same prompt and image size (``diffusers/pipelines/pixart_alpha/``):

* Prompt: the pipeline's own ``encode_prompt(prompt, do_classifier_free_guidance=False,
  max_sequence_length=..., clean_caption=False)`` -- T5 last hidden states, padded to the pipeline's
  default length (Sigma 300 tokens, Alpha 120; read from the method's signature), **with** the
  tokenizer's attention mask (``encoder_attention_mask``; the transformer turns it into a -10000
  bias). The mask stays an integer tensor: :meth:`Conditioning.to` casts floating tensors only.
* Added conditions: ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}`` (Sigma always;
  Alpha unless ``sample_size == 128``). The Alpha 1024 px model embeds the image size: ``resolution =
  [[H, W]]`` and ``aspect_ratio = [[H / W]]`` in pixels, in the prompt embeddings' dtype, one row per
  sample (``PixArtAlphaPipeline.__call__``, "Prepare micro-conditions"). We build them exactly when the
  transformer consumes them (``transformer.use_additional_conditions``, which the model sets from
  ``sample_size == 128`` unless its config says otherwise); otherwise they would be ignored anyway,
  so both pipelines' calls are reproduced.
* Timestep: variance-preserving on the scheduler's ``alphas_cumprod`` (linear betas 1e-4 .. 0.02), the
  transformer gets ``t`` itself (the pipeline passes the scheduler's integer timestep, expanded to the
  batch; the timestep embedding casts it to float, so a float ``t`` gives the same result).
* Latents: ``z * scaling_factor`` (the pipelines decode with ``latents / scaling_factor`` only).
  The transformer predicts 8 channels (noise and learned variance); features never read its output.

Taps: ``block0`` .. ``block{N-1}``, the output of ``transformer_blocks[i]`` (image tokens only: PixArt
blocks attend to the text through cross-attention and return image tokens), unpatchified to
``(B, inner_dim, h / p, w / p)`` on the latent's ``p x p`` patch grid (stride ``p`` = ``patch_size``,
2 for every released model: 1024 px -> 64 x 64). Default feature tap: ``block10`` when the model has
it (PixArt-Sigma/Alpha XL have 28 blocks): DistillDIFT reads PixArt block 10 -- its cross-attention
*query*; we read the block's output, the residual stream after that block. Smaller models default to
their middle block. The tap table's own default (what a distillation aligns) is the middle block.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from ..taps import discover_block_taps
from .conditioning import HIDDEN_STATES, Conditioning
from .latents import LatentBackbone

#: Key of the T5 attention mask in the conditioning (the transformer's forward argument of that name).
MASK = "encoder_attention_mask"
#: DistillDIFT's PixArt feature block (see the module docstring).
DISTILLDIFT_BLOCK = "block10"


class PixArtBackbone(LatentBackbone):
    """A PixArt-Sigma or PixArt-Alpha pipeline seen as a feature extractor.

    Args:
        pipe: a ``PixArtSigmaPipeline`` or ``PixArtAlphaPipeline`` (its text encoder may be ``None``
            once released).
        resolution: default image size; default ``transformer.config.sample_size * vae_scale_factor``
            (1024 for the 1024-MS models, 512 for the 512 ones).
        name: backbone name recorded in feature files (default ``pixart-sigma`` / ``pixart-alpha``).
    """

    name = "pixart-sigma"
    family = "pixart"
    text_encoder_names = ("text_encoder",)

    def __init__(self, pipe, resolution: int | None = None, name: str | None = None) -> None:
        from diffusers import DDPMScheduler  # noqa: PLC0415

        transformer = pipe.transformer
        patch = int(transformer.config.patch_size)
        taps = discover_block_taps(transformer, [("transformer_blocks", 0)], channels=transformer.inner_dim,
                                   stride=patch)
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        resolution = resolution or int(transformer.config.sample_size) * vae_factor
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        super().__init__(transformer, pipe.vae, scheduler, resolution=resolution, taps=taps)
        self.patch_size = patch
        self.max_sequence_length = _default_max_sequence_length(pipe)
        alpha = type(pipe).__name__.startswith("PixArtAlpha")
        self.adopt_pipeline(pipe, name or ("pixart-alpha" if alpha else "pixart-sigma"))
        self.default_feature_taps = default_feature_taps(taps.names)

    # ------------------------------------------------------------------ prompts

    def _encode_prompt_batch(self, prompts: list[str]) -> Conditioning:
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                     num_images_per_prompt=1, device=self._text_device(),
                                                     max_sequence_length=self.max_sequence_length,
                                                     clean_caption=False)
        return Conditioning({HIDDEN_STATES: embeds, MASK: mask})


    # ------------------------------------------------------------------ images
    def _latent_affine(self, like: torch.Tensor) -> tuple[float, float]:
        """``z * scaling_factor``: the PixArt pipelines ignore any ``shift_factor`` / ``latents_mean``."""
        return 0.0, self.scaling_factor

    # ------------------------------------------------------------------ the denoiser
    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p} (images must be "
                             f"multiples of {self.size_multiple} px)")
        return h // p, w // p

    def added_cond_kwargs(self, x: torch.Tensor, dtype: torch.dtype) -> dict:
        """PixArt's micro-conditions for latents ``x``: ``None`` unless the transformer embeds the image size.

        Then, as ``PixArtAlphaPipeline.__call__`` builds them: ``resolution`` ``(B, 2)`` = pixel
        ``(height, width)`` and ``aspect_ratio`` ``(B, 1)`` = ``height / width``, in ``dtype``.
        """
        if not getattr(self.denoiser, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        height, width = x.shape[-2] * self.latent_factor, x.shape[-1] * self.latent_factor
        batch = x.shape[0]
        resolution = torch.tensor([height, width]).repeat(batch, 1).to(dtype=dtype, device=x.device)
        aspect_ratio = torch.tensor([float(height / width)]).repeat(batch, 1).to(dtype=dtype, device=x.device)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def denoiser_inputs(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> dict:
        return dict(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.hidden_states,
                    encoder_attention_mask=cond[MASK],
                    added_cond_kwargs=self.added_cond_kwargs(x, cond.hidden_states.dtype))

    def describe(self) -> dict:
        return {**super().describe(), "patch_size": self.patch_size,
                "max_sequence_length": self.max_sequence_length}


def default_feature_taps(names: Sequence[str]) -> tuple[str, ...]:
    """``block10`` (DistillDIFT's PixArt block) when the model has it, else the middle block."""
    if DISTILLDIFT_BLOCK in names:
        return (DISTILLDIFT_BLOCK,)
    return (names[len(names) // 2],)


def _default_max_sequence_length(pipe) -> int:
    """The pipeline's own default T5 length (Sigma 300, Alpha 120): ``encode_prompt``'s signature."""
    parameter = inspect.signature(pipe.encode_prompt).parameters.get("max_sequence_length")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return 300
    return int(parameter.default)


def load(source: str, *, dtype: torch.dtype = torch.float32, resolution: int | None = None,
         local_files_only: bool = False, variant: str | None = None) -> PixArtBackbone:
    """Load a PixArt-Sigma / -Alpha diffusers folder or hub repo with the pipeline class it names."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline  # noqa: PLC0415

    from .families import pipeline_class_of  # noqa: PLC0415

    alpha = pipeline_class_of(source, local_files_only) == "PixArtAlphaPipeline"
    pipeline_class = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = pipeline_class.from_pretrained(source, torch_dtype=dtype, local_files_only=local_files_only,
                                          variant=variant)
    return PixArtBackbone(pipe, resolution=resolution)
