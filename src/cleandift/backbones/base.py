"""The backbone interface every extractor, trainer and evaluation talks to.

A backbone bundles a diffusers denoiser (a ``UNet2DConditionModel`` or a diffusion transformer) with
what turns images and prompts into its inputs: an image encoder (a VAE, or the identity for
pixel-space models), a prompt encoder returning a :class:`~.conditioning.Conditioning` (CLIP, two
CLIPs, CLIP + T5, T5, or a label encoder), a :class:`~.noise.NoiseProcess` (variance-preserving or
rectified flow) and a tap table. :meth:`DiffusionBackbone.run_taps` is the one way features are read:
the family builds its denoiser's call (conditioning, timestep units, latent packing) and the forward
stops after the last requested tap. Feature extraction and distillation need nothing else, which is
what lets one extractor and one trainer serve every family (one module per family in this package).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..taps import Tap, TapTable, discover_taps, stop_after_taps
from .conditioning import Conditioning
from .noise import NoiseProcess, VariancePreserving

PromptInput = str | Sequence[str] | None
Timestep = torch.Tensor | float


class DiffusionBackbone(nn.Module, ABC):
    """A frozen diffusion model seen as a feature extractor.

    Subclasses provide :meth:`encode_images` and :meth:`_encode_prompt_batch`, and (when their
    denoiser is not an SD-style U-Net) :meth:`denoiser_inputs` and :meth:`token_grid`. Everything
    runs on the device and dtype the caller moved the module to (``backbone.to(device, dtype)``);
    nothing here picks a device by itself.

    Attributes:
        denoiser: the diffusers U-Net or transformer (the *teacher* / frozen model); ``unet`` is the
            same module under its historical name.
        scheduler: the family's diffusers scheduler (read by :attr:`noise`, never stepped).
        noise: the :class:`~.noise.NoiseProcess` (default: variance-preserving on ``scheduler``).
        taps: the :class:`~cleandift.taps.TapTable` (default: discovered from a U-Net); its ``default``
            is what a distillation aligns, :attr:`default_feature_taps` what an extractor reads.
        resolution: the image side length the model was trained at (default input size).
        image_channels: channels the image encoder expects (3 for RGB models).
        latent_factor: pixels per denoiser input cell (8 for the SD VAE, 1 for pixel models).
    """

    name: str = "backbone"
    family: str = "stable-diffusion"
    #: Taps an extractor reads when the caller names none (DIFT's ``up_ft_index=1`` for SD); the tap
    #: table's own ``default`` is the set a distillation aligns.
    default_feature_taps: tuple[str, ...] = ("us6",)

    def __init__(self, unet: nn.Module, scheduler, resolution: int, latent_factor: int, image_channels: int = 3,
                 prompt_cache_size: int = 256, noise: NoiseProcess | None = None,
                 taps: TapTable | None = None) -> None:
        super().__init__()
        self.denoiser = unet
        self.scheduler = scheduler
        self.noise: NoiseProcess = noise if noise is not None else VariancePreserving(scheduler)
        self.resolution = int(resolution)
        self.latent_factor = int(latent_factor)
        self.image_channels = int(image_channels)
        self.taps: TapTable = taps if taps is not None else discover_taps(unet)
        self._prompt_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size
        self._kept_prompts: dict[str, dict[str, torch.Tensor]] | None = None  # set once the encoder is released

    # ------------------------------------------------------------------ properties
    @property
    def unet(self) -> nn.Module:
        """The denoiser (its historical name: every family before SDXL had a U-Net)."""
        return self.denoiser

    def __setattr__(self, name: str, value) -> None:  # ``backbone.unet = m`` replaces the denoiser
        super().__setattr__("denoiser" if name == "unet" else name, value)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return self.noise.num_train_timesteps

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels (the coarsest tap cell: SD's mid block, a DiT patch)."""
        return self.latent_factor * max(t.stride for t in self.taps)

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
    def encode_prompts(self, prompts: PromptInput, batch_size: int) -> Conditioning:
        """The denoiser's prompt conditioning for a prompt, a list of prompts or ``None``, batch ``batch_size``.

        ``None`` and ``""`` mean the empty prompt, encoded exactly as the family's own pipeline encodes
        ``""``. A single string is shared by the whole batch. Encodings are cached per distinct prompt,
        so a folder run with one prompt encodes it once. ``.hidden_states`` is the ``(B, L, D)`` text
        sequence (all SD 1.x/2.x needs).
        """
        check_prompt_type(prompts)
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
                encoded = Conditioning.of(self._encode_prompt_batch(todo))
            for prompt, row in zip(todo, encoded.rows()):
                self._prompt_cache[prompt] = {k: v.detach() for k, v in row.items()}
                if len(self._prompt_cache) > self._prompt_cache_size:
                    self._prompt_cache.popitem(last=False)
        return Conditioning.stack([self._cached(p) for p in prompts]).to(device=self.device, dtype=self.dtype)

    def _cached(self, prompt: str) -> dict[str, torch.Tensor] | None:
        if self._kept_prompts is not None and prompt in self._kept_prompts:
            return self._kept_prompts[prompt]
        return self._prompt_cache.get(prompt)

    @abstractmethod
    def _encode_prompt_batch(self, prompts: list[str]) -> Conditioning | torch.Tensor:
        """Encode distinct prompts (a :class:`Conditioning`, or bare ``(N, L, D)`` hidden states)."""

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
                kept.update(zip(chunk, self.encode_prompts(chunk, len(chunk)).rows()))
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

    def enable_model_offload(self, device: torch.device | str) -> None:
        """Keep weights in CPU memory, moving each model to ``device`` only while it runs (pipeline families)."""
        raise ConfigError(f"model CPU offload needs a diffusers pipeline family (SDXL, SD3, PixArt, Flux); "
                          f"{self.name} fits on one device: load it without offload")

    def release_decoder(self) -> int:
        """Free the image decoder (SD's VAE decoder): features and training only encode. Returns the bytes freed."""
        return 0

    def release_encoder(self) -> int:
        """Free the image encoder once every image it will see is encoded (``cache_latents`` training).

        Later :meth:`encode_images` calls raise. Returns the bytes freed (0: no encoder worth freeing).
        """
        return 0

    def _apply(self, fn, *args, **kwargs):  # cached encodings follow the module's device / dtype, like buffers
        def move(row: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # module fns cast floating tensors only
            return {k: fn(v) for k, v in row.items()}

        self._prompt_cache = OrderedDict((p, move(e)) for p, e in self._prompt_cache.items())
        if self._kept_prompts is not None:
            self._kept_prompts = {p: move(e) for p, e in self._kept_prompts.items()}
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ noise
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` for training timesteps ``t`` ``(B,)`` under the family's :attr:`noise` process.

        VP: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; flow: ``(1 - sigma_t) x0 + sigma_t noise``.
        Computed in float32 and returned in ``x0``'s dtype.
        """
        return self.noise.add_noise(x0, noise, t, seq_len=self.token_count(x0))

    def sigma(self, t: Timestep, x0: torch.Tensor | None = None) -> float:
        """The family's noise level at ``t`` for latents like ``x0`` (recorded in feature files)."""
        seq_len = self.token_count(x0) if x0 is not None else None
        return float(self.noise.sigma(torch.as_tensor(float(t)), seq_len=seq_len))

    # ------------------------------------------------------------------ the denoiser
    def token_grid(self, x: torch.Tensor) -> tuple[int, int] | None:
        """Token grid ``(h, w)`` of denoiser inputs like ``x`` (``None`` for U-Nets: their taps are maps)."""
        return None

    def token_count(self, x: torch.Tensor) -> int | None:
        grid = self.token_grid(x)
        return grid[0] * grid[1] if grid is not None else None

    def denoiser_inputs(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> dict:
        """Keyword arguments of the denoiser's forward for latents ``x`` at model-unit ``timestep`` ``(B,)``.

        The default is the SD 1.x/2.x U-Net call; families with added conditioning override it.
        """
        return dict(sample=x, timestep=timestep, encoder_hidden_states=cond.hidden_states)

    def run_taps(self, x: torch.Tensor, t: Timestep, cond: Conditioning | torch.Tensor, taps: Sequence[Tap],
                 *, denoiser: nn.Module | None = None, stop_early: bool = True) -> dict[str, torch.Tensor]:
        """Features ``{tap: (B, C, h, w)}`` of the denoiser on inputs ``x`` at user timestep(s) ``t``.

        ``t`` is a float (a student's scalar timestep) or a ``(B,)`` tensor in the user convention
        (``[0, 999]``, larger is noisier); the :attr:`noise` process turns it into the units the model
        expects. ``denoiser`` defaults to the frozen :attr:`denoiser` (pass a student to read it
        instead). The forward stops right after the last requested tap.
        """
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(float(t), device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        model_t = self.noise.model_timestep(t, seq_len=self.token_count(x))
        inputs = self.denoiser_inputs(x, model_t, Conditioning.of(cond))
        return stop_after_taps(denoiser if denoiser is not None else self.denoiser, taps, inputs,
                               stop_early=stop_early, grid=self.token_grid(x))

    #: the AdaLN-modulated norm of each transformer block list's blocks (``{"transformer_blocks": "norm1"}``);
    #: empty when the family has no module computing it (U-Nets, PixArt): see :mod:`cleandift.dit_cleanup`
    adaln_norms: dict[str, str] = {}

    def readout_taps(self, taps: Sequence[Tap], readout: str = "residual") -> list[Tap]:
        """``taps`` read as ``readout``: ``"residual"`` (the block outputs) or ``"adaln"`` (each block's output
        through the following AdaLN-modulated normalisation; see :mod:`cleandift.dit_cleanup`)."""
        from ..dit_cleanup import check_readout  # noqa: PLC0415

        if check_readout(readout) == "residual":
            return list(taps)
        if not self.adaln_norms:
            raise ConfigError(f"the {self.family} family has no AdaLN readout (its denoiser computes no modulated "
                             "norm in a module); use readout='residual'")
        chain = list(self.taps)
        following = {a.name: b.module for a, b in zip(chain, chain[1:])}

        def norm_after(tap: Tap) -> str:
            nxt = following.get(tap.name)
            if nxt is None:
                return "norm_out"
            return f"{nxt}.{self.adaln_norms[nxt.rsplit('.', 1)[0]]}"

        return [replace(tap, module=norm_after(tap), stream=0) for tap in taps]

    def input_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """Shape ``(C, h, w)`` of the denoiser's (unpacked) latent for an image of ``(H, W)`` pixels."""
        h, w = image_size
        return (int(self.latent_channels), h // self.latent_factor, w // self.latent_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def describe(self) -> dict:
        """Small JSON-able summary recorded next to extracted features and results."""
        return {"backbone": self.name, "family": self.family, "resolution": self.resolution,
                "latent_factor": self.latent_factor, "unet_class": type(self.denoiser).__name__,
                "taps": list(self.taps.names), **self.noise.describe()}


def check_prompt_type(prompts: object) -> None:
    """Refuse prompts that are not ``None``, a string or a sequence of strings / ``None``.

    Why: the generic encoder turns anything into text with ``str()``, so a tensor or a number would
    silently become the prompt ``"tensor([...])"`` or ``"5"``.
    """
    if prompts is None or isinstance(prompts, str):
        return
    if isinstance(prompts, (list, tuple)) and all(p is None or isinstance(p, str) for p in prompts):
        return
    got = type(prompts).__name__
    if isinstance(prompts, (list, tuple)):
        got = f"{got} holding {', '.join(sorted({type(p).__name__ for p in prompts}))}"
    raise TypeError(f"prompts must be a string, a list of strings or None, got {got}")
