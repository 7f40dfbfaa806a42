"""Feature extraction, the CleanDIFT way and the DIFT way, behind one interface.

>>> extractor = CleanExtractor(backbone)                       # doctest: +SKIP
>>> feats = extractor(images, prompts="a photo of a cat")      # {tap: (B, C, h, w)}  # doctest: +SKIP

* :class:`CleanExtractor` -- one forward pass of the (fine-tuned) student on the *clean* latent at a
  fixed timestep input (261 by default, what the released students were trained with).
* :class:`NoisyExtractor` -- DIFT: noise the latent to timestep ``t``, run the frozen U-Net, average
  the features over an ensemble of noise draws.

Both encode each image once and each distinct prompt once, batch images and ensemble members
together in chunks of at most ``chunk_size`` U-Net samples, stop the U-Net right after the last
requested tap, and return float32 maps ``{tap: (B, C, h, w)}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, Sequence

import torch
from torch import nn

from .backbones.base import DiffusionBackbone, PromptInput
from .images import ResizePolicy, ResizeTransform, prepare_images
from .taps import Tap
from .timesteps import DIFT_TIMESTEP, validate_timestep

NoiseMode = Literal["independent", "shared"]
#: one generator for the whole batch, or one per image (features then never depend on the batch)
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


def image_generators(images: torch.Tensor, seed: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded from ``seed`` and the image content.

    The same seeding as ``eval`` (:func:`cleandift.eval.descriptors.image_seed`): an image's noise, and so
    its noisy features, do not depend on its neighbours, the batch size or the order of a folder run.
    """
    from .eval.descriptors import image_seed  # noqa: PLC0415

    return [torch.Generator().manual_seed(image_seed(image, seed)) for image in images]


class FeatureExtractor(ABC):
    """Common interface: ``extractor(images, prompts, taps) -> {tap: (B, C, h, w)}``.

    Args:
        backbone: the diffusion backbone (VAE / prompt encoder / scheduler and the frozen U-Net).
        taps: default taps to return (names, comma string, ``"all"``; ``None``: the family's ``default_feature_taps``, ``us6`` for SD).
        chunk_size: maximum number of U-Net samples per forward call (bounds memory; the ensemble
            of a noisy extractor counts: 2 images x 8 draws = 16 samples).
        sample_posterior: draw the VAE latent from its posterior instead of taking the mean.
        readout: ``"residual"`` (block outputs, default) or ``"adaln"`` (diffusion transformers: each
            block's output through the next AdaLN-modulated norm); see :mod:`cleandift.dit_cleanup`.
        massive_ratio: zero channels whose RMS exceeds this multiple of the image's median channel RMS
            ("massive activations" of DiTs); ``None`` (default) keeps every channel.
    """

    mode: str = "base"

    def __init__(self, backbone: DiffusionBackbone, taps: str | Sequence[str] | None = None,
                 chunk_size: int = 8, sample_posterior: bool = False, readout: str = "residual",
                 massive_ratio: float | None = None) -> None:
        from .dit_cleanup import check_readout  # noqa: PLC0415

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if massive_ratio is not None and not massive_ratio > 1:
            raise ValueError(f"massive_ratio must be > 1 (a multiple of the median channel RMS), got {massive_ratio}")
        self.backbone = backbone
        self.readout = check_readout(readout)
        self.massive_ratio = massive_ratio
        backbone.readout_taps([], readout)  # fail early on a readout the family does not offer
        self.default_taps = taps if taps is not None else backbone.default_feature_taps
        self.chunk_size = chunk_size
        self.sample_posterior = sample_posterior
        backbone.taps.select(self.default_taps)  # fail early on bad names

    @property
    def unet(self) -> nn.Module:
        return self.backbone.unet

    def select_taps(self, taps: str | Sequence[str] | None) -> list[Tap]:
        selected = self.backbone.taps.select(taps if taps is not None else self.default_taps)
        return self.backbone.readout_taps(selected, self.readout)

    def _clean(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply the massive-activation option (per image) to finished features."""
        if self.massive_ratio is None:
            return feats
        from .dit_cleanup import suppress_massive_activations  # noqa: PLC0415

        return {name: suppress_massive_activations(f, self.massive_ratio)[0] for name, f in feats.items()}

    def __call__(self, images: torch.Tensor, prompts: PromptInput = None, taps: str | Sequence[str] | None = None,
                 generator: GeneratorArg = None) -> dict[str, torch.Tensor]:
        return self.extract(images, prompts=prompts, taps=taps, generator=generator)

    @torch.no_grad()
    def extract(self, images: torch.Tensor, prompts: PromptInput = None, taps: str | Sequence[str] | None = None,
                generator: GeneratorArg = None) -> dict[str, torch.Tensor]:
        """Features of a batch of images ``(B, 3, H, W)`` in ``[-1, 1]`` (H, W multiples of the cell size).

        ``generator`` is one generator for the batch or a list with one per image (see
        :func:`image_generators`); it matters only where noise is drawn.
        """
        images = self._check_images(images)
        _check_generators(generator, images.shape[0])
        selected = self.select_taps(taps)
        cond = self.backbone.encode_prompts(prompts, images.shape[0])
        return self._clean(self._extract(images, cond, selected, generator))

    def extract_pil(self, images: Sequence, size: int | None = None, resize: ResizePolicy = "stretch",
                    prompts: PromptInput = None, taps: str | Sequence[str] | None = None,
                    generator: GeneratorArg = None) -> tuple[dict[str, torch.Tensor], list[ResizeTransform]]:
        """Resize PIL images to the model frame and extract; also returns each image's transform."""
        batch, transforms = prepare_images(images, size or self.backbone.resolution, resize)
        return self.extract(batch, prompts=prompts, taps=taps, generator=generator), transforms

    @abstractmethod
    def _extract(self, images: torch.Tensor, cond: torch.Tensor, taps: list[Tap],
                 generator: GeneratorArg) -> dict[str, torch.Tensor]:
        """Extract from validated images and encoded prompts."""

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor in [-1, 1], got {shape}")
        cell = self.backbone.size_multiple
        h, w = images.shape[-2:]
        if h % cell or w % cell:
            raise ValueError(f"image size {h}x{w} is not a multiple of {cell} px (the U-Net's coarsest cell); "
                             f"resize with cleandift.images.resize_image or pass --size")
        channels = self.backbone.image_channels
        if images.shape[1] != channels:
            if images.shape[1] == 3 and channels == 1:
                images = images.mean(dim=1, keepdim=True)
            elif images.shape[1] == 1 and channels == 3:
                images = images.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"images have {images.shape[1]} channels, the backbone expects {channels}")
        _check_finite(images)
        return images

    def _encode(self, images: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        if isinstance(generator, (list, tuple)):
            if not self.sample_posterior:  # deterministic encoding: the generators are not used
                return self.backbone.encode_images(images, sample_posterior=False)
            return torch.cat([self.backbone.encode_images(image[None], sample_posterior=True, generator=g)
                              for image, g in zip(images, generator)])
        return self.backbone.encode_images(images, sample_posterior=self.sample_posterior, generator=generator)

    def describe(self) -> dict:
        return {"mode": self.mode, "sample_posterior": self.sample_posterior, "readout": self.readout,
                "massive_ratio": self.massive_ratio, **self.backbone.describe()}


class CleanExtractor(FeatureExtractor):
    """CleanDIFT features: the student U-Net on the clean latent, one pass, no noise.

    Args:
        backbone: supplies the VAE, prompt encoder and (by default) the U-Net.
        unet: the fine-tuned student; defaults to ``backbone.unet`` (which then gives the
            "naive clean" baseline: a frozen model fed a clean input).
        timestep: the timestep input the student sees. The released students were trained with a
            learnable scalar initialised at 261 (and their ``*_full`` files store it). Default: the
            value :func:`~cleandift.checkpoints.load_student` read from the checkpoint, else 261.
    """

    mode = "clean"

    def __init__(self, backbone: DiffusionBackbone, unet: nn.Module | None = None, timestep: float | None = None,
                 taps: str | Sequence[str] | None = None, chunk_size: int = 8, sample_posterior: bool = False,
                 readout: str = "residual", massive_ratio: float | None = None) -> None:
        super().__init__(backbone, taps=taps, chunk_size=chunk_size, sample_posterior=sample_posterior,
                         readout=readout, massive_ratio=massive_ratio)
        self.student = unet if unet is not None else backbone.unet
        if timestep is None:  # the learned value load_student recorded, else the students' initial 261
            timestep = getattr(self.student, "cleandift_timestep", None)
            timestep = DIFT_TIMESTEP if timestep is None else timestep
        self.timestep = float(validate_timestep(timestep, backbone.num_train_timesteps, "timestep"))

    @property
    def unet(self) -> nn.Module:
        return self.student

    def _extract(self, images, cond, taps, generator):
        out: dict[str, list[torch.Tensor]] = {t.name: [] for t in taps}
        for start in range(0, images.shape[0], self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            x0 = self._encode(images[sl], generator[sl] if isinstance(generator, (list, tuple)) else generator)
            feats = self.backbone.run_taps(x0.to(self._dtype()), self.timestep, cond[sl].to(self._dtype()), taps,
                                           denoiser=self.student)
            for name, f in feats.items():
                out[name].append(f.float())
        return {name: torch.cat(chunks) for name, chunks in out.items()}

    def _dtype(self) -> torch.dtype:
        return next(self.student.parameters()).dtype

    def describe(self) -> dict:
        return {**super().describe(), "timestep": self.timestep}


class NoisyExtractor(FeatureExtractor):
    """DIFT features: ``x_t = add_noise(x0, eps, t)`` through the frozen U-Net, averaged over draws.

    Args:
        t: timestep in ``[0, 999]``, larger is noisier (DIFT: 261 for semantic correspondence). A whole
            number for DDPM families; flow families (SD3, Flux) take any real ``t`` (``sigma = shift(t/1000)``).
        sigma: give the noise level directly instead of ``t`` (flow: the sigma of ``x_t = (1-sigma) x0 +
            sigma eps``; DDPM: ``sqrt(1 - abar_t)``, rounded to the nearest timestep). With a
            resolution-dependent shift (Flux) ``t`` is derived per image size.
        ensemble: number of noise draws averaged (DIFT: 8).
        noise: ``independent`` -- every image gets its own draws; ``shared`` -- all images in a
            batch use the same draws (SD-DINO's fixed shared noise).
        sample_posterior: DIFT samples the VAE posterior (default here too); each ensemble member
            gets its own posterior sample, drawn from one encoding of the image.
    """

    mode = "noisy"

    def __init__(self, backbone: DiffusionBackbone, t: float = DIFT_TIMESTEP, ensemble: int = 8,
                 noise: NoiseMode = "independent", taps: str | Sequence[str] | None = None, chunk_size: int = 8,
                 sample_posterior: bool = True, sigma: float | None = None, readout: str = "residual",
                 massive_ratio: float | None = None) -> None:
        super().__init__(backbone, taps=taps, chunk_size=chunk_size, sample_posterior=sample_posterior,
                         readout=readout, massive_ratio=massive_ratio)
        discrete = backbone.noise.discrete
        self.sigma = None if sigma is None else float(sigma)
        if self.sigma is not None:
            t = backbone.noise.timestep_for_sigma(self.sigma, seq_len=backbone.token_count(
                torch.empty(1, 1, *[backbone.resolution // backbone.latent_factor] * 2)))
        t = validate_timestep(t, backbone.num_train_timesteps, "t", integer=discrete)
        self.t = int(t) if discrete else float(t)
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        if noise not in ("independent", "shared"):
            raise ValueError(f"noise must be 'independent' or 'shared', got {noise!r}")
        self.ensemble = ensemble
        self.noise_mode = noise

    def draw_noise(self, batch_size: int, shape: tuple[int, ...], generator: GeneratorArg,
                   device: torch.device) -> torch.Tensor:
        """Noise of shape ``(E, B, *shape)``; with ``shared`` every image gets the same draws.

        With one generator per image, image ``i``'s draws come from ``generator[i]`` alone (exactly what
        extracting that image by itself with that generator draws).
        """
        if isinstance(generator, (list, tuple)):
            if self.noise_mode == "shared":
                raise ValueError("noise='shared' gives every image the same draws: pass one generator, "
                                 "not one per image")
            eps = [torch.randn((self.ensemble, 1, *shape), generator=g, device=g.device) for g in generator]
            return torch.cat(eps, dim=1).to(device)
        n = 1 if self.noise_mode == "shared" else batch_size
        gen_device = generator.device if generator is not None else "cpu"
        eps = torch.randn((self.ensemble, n, *shape), generator=generator, device=gen_device)
        return eps.expand(self.ensemble, batch_size, *shape).to(device)

    @torch.no_grad()
    def extract(self, images: torch.Tensor, prompts: PromptInput = None, taps=None,
                generator: GeneratorArg = None, noise: torch.Tensor | None = None,
                posterior_noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """As :meth:`FeatureExtractor.extract`; ``noise`` ``(E, B, c, h, w)`` overrides the draws.

        Noise is drawn as: diffusion noise for all (E, B) first, then posterior noise, both from
        ``generator`` -- so a fixed seed reproduces the features exactly. With one generator per image
        (:func:`image_generators`) an image's features do not depend on the rest of the batch.
        """
        images = self._check_images(images)
        _check_generators(generator, images.shape[0])
        selected = self.select_taps(taps)
        cond = self.backbone.encode_prompts(prompts, images.shape[0])
        return self._clean(self._extract(images, cond, selected, generator, noise, posterior_noise))

    def _extract(self, images, cond, taps, generator, noise=None, posterior_noise=None):
        b = images.shape[0]
        mean, std = self.backbone.image_moments(images)
        shape = tuple(mean.shape[1:])
        if noise is None:
            noise = self.draw_noise(b, shape, generator, mean.device)
        if noise.shape != (self.ensemble, b, *shape):
            raise ValueError(f"noise must have shape {(self.ensemble, b, *shape)}, got {tuple(noise.shape)}")
        x0 = mean.unsqueeze(0).expand(self.ensemble, *mean.shape)
        if self.sample_posterior and std is not None:
            if posterior_noise is None:
                posterior_noise = self.draw_noise(b, shape, generator, mean.device)
            x0 = x0 + std.unsqueeze(0) * posterior_noise.to(std)
        dtype = self.backbone.dtype
        flat_x0 = x0.reshape(self.ensemble * b, *shape)
        flat_eps = noise.reshape(self.ensemble * b, *shape)
        sums = {t.name: None for t in taps}
        # Chunks run over the (E*B) samples; order is draw-major so one image's draws stay together
        # with the ordering of ``noise``.
        order = torch.arange(self.ensemble * b).view(self.ensemble, b).t().reshape(-1)  # image-major
        for start in range(0, order.numel(), self.chunk_size):
            idx = order[start:start + self.chunk_size].to(flat_x0.device)
            t = torch.full((idx.numel(),), self.timestep_for(mean), device=flat_x0.device,
                           dtype=torch.long if self.backbone.noise.discrete else torch.float32)
            xt = self.backbone.add_noise(flat_x0[idx].float(), flat_eps[idx].float(), t).to(dtype)
            feats = self.backbone.run_taps(xt, t, cond[idx % b].to(dtype), taps)
            image_index = (idx % b).to(flat_x0.device)
            for name, f in feats.items():
                if sums[name] is None:
                    sums[name] = torch.zeros((b, *f.shape[1:]), device=f.device, dtype=torch.float32)
                sums[name].index_add_(0, image_index, f.float())
        return {name: s / self.ensemble for name, s in sums.items()}

    def timestep_for(self, x0: torch.Tensor) -> float:
        """``t`` for latents like ``x0``: fixed, or from ``sigma`` at this image size (a resolution-dependent shift)."""
        if self.sigma is None or self.backbone.noise.discrete:
            return self.t
        return self.backbone.noise.timestep_for_sigma(self.sigma, seq_len=self.backbone.token_count(x0))

    def describe(self) -> dict:
        out = {**super().describe(), "t": self.t, "ensemble": self.ensemble, "noise": self.noise_mode}
        if self.sigma is not None:
            out["sigma"] = self.sigma
        return out


def _check_generators(generator: GeneratorArg, batch_size: int) -> None:
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch_size} images (pass one per image, "
                         "or a single generator)")


def _check_finite(images: torch.Tensor) -> None:
    """Refuse NaN/inf pixels: they would silently turn every feature of the batch into NaN."""
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = [int(i) for i in torch.nonzero(~finite).flatten()]
        raise ValueError(f"images contain non-finite values (NaN/inf) in batch position(s) "
                         f"{', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}; "
                         "images must be finite, in [-1, 1]")
