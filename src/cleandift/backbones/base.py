"""The backbone interface every extractor, trainer and evaluation talks to.

A backbone bundles a diffusers ``UNet2DConditionModel`` with what turns images and prompts into its
inputs: an image encoder (the SD VAE, or the identity for pixel-space models), a prompt encoder
(CLIP, or a label encoder) and the noise schedule (``add_noise``). Feature extraction never needs
anything else, which is what lets one extractor serve Stable Diffusion and the bundled pixel model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..taps import TapTable, discover_taps
from ..timesteps import DEFAULT_NUM_TRAIN_TIMESTEPS

PromptInput = str | Sequence[str] | None


class DiffusionBackbone(nn.Module, ABC):
    """A frozen diffusion model seen as a feature extractor.

    Subclasses provide :meth:`encode_images` and :meth:`_encode_prompt_batch`. Everything runs on
    the device and dtype the caller moved the module to (``backbone.to(device, dtype)``); nothing
    here picks a device by itself.

    Attributes:
        unet: the diffusers U-Net (the *teacher* / frozen model).
        scheduler: a diffusers scheduler; only its ``add_noise`` / ``alphas_cumprod`` are used.
        resolution: the image side length the model was trained at (default input size).
        image_channels: channels the image encoder expects (3 for RGB models).
        latent_factor: pixels per U-Net input cell (8 for the SD VAE, 1 for pixel models).
    """

    name: str = "backbone"

    def __init__(self, unet: nn.Module, scheduler, resolution: int, latent_factor: int, image_channels: int = 3,
                 prompt_cache_size: int = 256) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.resolution = int(resolution)
        self.latent_factor = int(latent_factor)
        self.image_channels = int(image_channels)
        self.taps: TapTable = discover_taps(unet)
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size
        self._kept_prompts: dict[str, torch.Tensor] | None = None  # set once the prompt encoder is released

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(getattr(self.scheduler.config, "num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS))

    # ------------------------------------------------------------------ images
    @abstractmethod
    def encode_images(self, images: torch.Tensor, sample_posterior: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` in ``[-1, 1]`` to U-Net inputs ``x0`` (latents or pixels)."""

    def image_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and std of the encoder posterior (std ``None`` for deterministic encoders).

        Lets a noisy ensemble encode an image once and still draw an independent posterior
        sample per ensemble member (what DIFT gets by encoding the image eight times).
        """
        return self.encode_images(images, sample_posterior=False), None

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: PromptInput, batch_size: int) -> torch.Tensor:
        """Encoder hidden states ``(batch_size, L, D)`` for a prompt, a list of prompts or ``None``.

        ``None`` and ``""`` mean the unconditional (empty) prompt. A single string is shared by the
        whole batch. Encodings are cached per distinct prompt, so a folder run with one prompt
        encodes it once.
        """
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or ""] * batch_size
        prompts = ["" if p is None else str(p) for p in prompts]
        if len(prompts) != batch_size:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch_size} images")
        todo = [p for p in dict.fromkeys(prompts) if self._cached(p) is None]
        if todo:
            if self._kept_prompts is not None:
                raise RuntimeError(
                    f"prompt {todo[0]!r} was not encoded before the prompt encoder was released (kept: "
                    f"{sorted(self._kept_prompts)}); pass every prompt to release_prompt_encoder(), or load the "
                    "backbone again")
            with torch.no_grad():
                encoded = self._encode_prompt_batch(todo)
            for prompt, emb in zip(todo, encoded):
                self._prompt_cache[prompt] = emb.detach()
                if len(self._prompt_cache) > self._prompt_cache_size:
                    self._prompt_cache.popitem(last=False)
        rows = [self._cached(p) for p in prompts]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)

    def _cached(self, prompt: str) -> torch.Tensor | None:
        if self._kept_prompts is not None and prompt in self._kept_prompts:
            return self._kept_prompts[prompt]
        return self._prompt_cache.get(prompt)

    @abstractmethod
    def _encode_prompt_batch(self, prompts: list[str]) -> torch.Tensor:
        """Encode distinct prompts to ``(N, L, D)`` on the backbone's device."""

    def clear_prompt_cache(self) -> None:
        """Forget cached encodings (kept prompts of a released encoder stay: they cannot be recomputed)."""
        self._prompt_cache.clear()

    def release_prompt_encoder(self, prompts: Sequence[str]) -> int:
        """Encode ``prompts`` once, keep only their embeddings and free the prompt encoder.

        Why: a distillation on uncaptioned images only ever needs the empty (or one fixed) prompt,
        and SD 1.5's CLIP text encoder is 0.49 GB of weights that would otherwise sit idle for the
        whole run. Later calls with another prompt raise. Returns the bytes freed.
        """
        prompts = ["" if p is None else str(p) for p in prompts]
        if self._kept_prompts is None:
            unique = list(dict.fromkeys(prompts))
            kept: dict[str, torch.Tensor] = {}
            for start in range(0, len(unique), 64):  # batched, and never more than the LRU cache holds
                chunk = unique[start:start + 64]
                kept.update(zip(chunk, self.encode_prompts(chunk, len(chunk))))
            freed = self._drop_prompt_encoder()
            self._kept_prompts = kept
            self._prompt_cache.clear()  # everything it held is either kept or no longer computable
            return freed
        missing = [p for p in prompts if p not in self._kept_prompts]
        if missing:
            self.encode_prompts(missing, len(missing))  # raises: the encoder is gone
        return 0

    def _drop_prompt_encoder(self) -> int:
        """Delete the prompt encoder's weights; returns the bytes freed (0: nothing worth freeing)."""
        return 0

    def release_decoder(self) -> int:
        """Free the image decoder (SD's VAE decoder): features and training only encode. Returns the bytes freed."""
        return 0

    def _apply(self, fn, *args, **kwargs):  # cached encodings follow the module's device / dtype, like buffers
        self._prompt_cache = OrderedDict((p, fn(e)) for p, e in self._prompt_cache.items())
        if self._kept_prompts is not None:
            self._kept_prompts = {p: fn(e) for p, e in self._kept_prompts.items()}
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ noise
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` with the model's own schedule.

        ``t`` is a ``(B,)`` integer tensor of training timesteps (see :mod:`cleandift.timesteps`).
        Computed in float32 and returned in ``x0``'s dtype.
        """
        alphas = self.scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)
        abar = alphas[t.to(x0.device).long()].view(-1, *([1] * (x0.ndim - 1)))
        xt = abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()
        return xt.to(x0.dtype)

    def input_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """Shape ``(C, h, w)`` of the U-Net input for an image of ``(H, W)`` pixels."""
        h, w = image_size
        return (int(self.unet.config.in_channels), h // self.latent_factor, w // self.latent_factor)

    def describe(self) -> dict:
        """Small JSON-able summary recorded next to extracted features and results."""
        return {"backbone": self.name, "resolution": self.resolution, "latent_factor": self.latent_factor,
                "unet_class": type(self.unet).__name__, "taps": list(self.taps.names)}
