"""Noise processes: how a family turns a clean latent ``x0`` into ``x_t``, and what timestep its denoiser sees.

Every family shares one user-facing convention (:mod:`cleandift.timesteps`): ``t`` is a number in
``[0, num_train_timesteps - 1]`` (``[0, 999]``), larger is noisier. A noise process makes that exact per family:

* :class:`VariancePreserving` (DDPM: SD 1.x/2.x, SDXL, PixArt, the bundled mini model) --
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; ``t`` indexes the scheduler's ``alphas_cumprod`` and
  the denoiser receives ``t`` itself.
* :class:`RectifiedFlow` (SD3/3.5, Flux) -- ``x_t = (1 - sigma) x0 + sigma eps`` with
  ``sigma = shift(t / 1000)``: the scheduler's static shift (SD3) or its resolution-dependent shift
  (Flux: ``mu`` from the image's token count, as ``pipeline_flux.calculate_shift``). ``t = 0`` is
  ``sigma = 0``, exactly the clean latent. The denoiser receives ``sigma * timestep_scale`` (SD3: 1000;
  Flux: 1, its transformer multiplies by 1000 itself).

A caller may also give ``sigma`` directly (``--sigma``) to reproduce peers that quote raw sigma values.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

#: Token count at which a dynamically shifted flow model uses ``base_shift`` / ``max_shift`` (Flux defaults).
_FLUX_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


class NoiseProcess(ABC):
    """Forward noising and timestep units of one family (see the module docstring)."""

    kind: str = "base"
    num_train_timesteps: int = 1000
    #: noise is added at integer timesteps only (a DDPM schedule); flow noise is continuous in t
    discrete: bool = True

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *,
                  seq_len: int | None = None) -> torch.Tensor:
        """``x_t`` for training timesteps ``t`` ``(B,)``; float32 arithmetic, returned in ``x0``'s dtype.

        ``seq_len`` is the image's token count (only resolution-dependent flow shifts use it).
        """

    @abstractmethod
    def model_timestep(self, t: torch.Tensor, *, seq_len: int | None = None) -> torch.Tensor:
        """What the denoiser's ``timestep`` argument receives for user timesteps ``t`` (float tensor)."""

    @abstractmethod
    def sigma(self, t: torch.Tensor, *, seq_len: int | None = None) -> torch.Tensor:
        """Noise level of ``t`` in the family's own terms (VP: ``sqrt(1 - abar)``; flow: ``sigma``)."""

    @abstractmethod
    def timestep_for_sigma(self, sigma: float, *, seq_len: int | None = None) -> float:
        """The user timestep whose noise level is ``sigma`` (``--sigma``: reproduce peers that quote sigma)."""

    def describe(self, seq_len: int | None = None) -> dict:
        return {"noise_process": self.kind}


class VariancePreserving(NoiseProcess):
    """DDPM forward process on the scheduler's ``alphas_cumprod`` (``t`` is its index)."""

    kind = "variance-preserving"

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.num_train_timesteps = int(getattr(scheduler.config, "num_train_timesteps", 1000))

    def _abar(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        return alphas[t.to(device).long()]

    def add_noise(self, x0, noise, t, *, seq_len=None):
        abar = self._abar(t, x0.device).view(-1, *([1] * (x0.ndim - 1)))
        xt = abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()
        return xt.to(x0.dtype)

    def model_timestep(self, t, *, seq_len=None):
        return t

    def sigma(self, t, *, seq_len=None):
        return (1 - self._abar(torch.as_tensor(t), torch.device("cpu"))).sqrt()

    def timestep_for_sigma(self, sigma, *, seq_len=None):
        """The integer t whose ``sqrt(1 - abar_t)`` is nearest to ``sigma`` (a DDPM schedule is discrete)."""
        _check_sigma(sigma)
        table = (1 - self.scheduler.alphas_cumprod.to(torch.float64)).sqrt()
        return float(int((table - float(sigma)).abs().argmin()))

    def describe(self, seq_len=None):
        return {"noise_process": self.kind, "prediction_type": getattr(self.scheduler.config, "prediction_type", None)}


class RectifiedFlow(NoiseProcess):
    """Rectified flow ``x_t = (1 - sigma) x0 + sigma eps`` with the scheduler's shift of ``sigma = t / 1000``.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (its ``shift``, ``use_dynamic_shifting`` and
            ``time_shift`` are used as they are).
        timestep_scale: factor between sigma and the denoiser's ``timestep`` input (SD3 1000, Flux 1).
    """

    kind = "rectified-flow"
    discrete = False

    def __init__(self, scheduler, timestep_scale: float) -> None:
        self.scheduler = scheduler
        self.num_train_timesteps = int(getattr(scheduler.config, "num_train_timesteps", 1000))
        self.timestep_scale = float(timestep_scale)

    @property
    def dynamic(self) -> bool:
        return bool(getattr(self.scheduler.config, "use_dynamic_shifting", False))

    def mu(self, seq_len: int | None) -> float:
        """Resolution-dependent shift exponent, as the Flux pipeline computes it from the token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: PLC0415

        if seq_len is None:
            raise ValueError("a dynamically shifted flow model needs the image's token count (seq_len)")
        cfg = {k: getattr(self.scheduler.config, k, None) or v for k, v in _FLUX_SHIFT_DEFAULTS.items()}
        return float(calculate_shift(seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                                     cfg["base_shift"], cfg["max_shift"]))

    def sigma(self, t, *, seq_len=None):
        """``sigma`` for user timesteps ``t`` (differentiable in ``t``: a learned student timestep trains)."""
        s = torch.as_tensor(t).float() / self.num_train_timesteps
        if self.dynamic:
            shifted = self.scheduler.time_shift(self.mu(seq_len), 1.0, s.clamp_min(1e-12))
            return torch.where(s > 0, shifted, torch.zeros_like(s))
        shift = float(self.scheduler.config.shift)
        return shift * s / (1 + (shift - 1) * s)

    def timestep_for_sigma(self, sigma, *, seq_len=None):
        """Inverse of :meth:`sigma`: ``t = 1000 s`` with ``s`` the unshifted sigma."""
        sigma = _check_sigma(sigma)
        if sigma in (0.0, 1.0):
            return sigma * self.num_train_timesteps
        if self.dynamic:
            s = 1 / (1 + math.exp(self.mu(seq_len)) * (1 / sigma - 1))
        else:
            shift = float(self.scheduler.config.shift)
            s = sigma / (shift - (shift - 1) * sigma)
        return s * self.num_train_timesteps

    def add_noise(self, x0, noise, t, *, seq_len=None):
        sigma = self.sigma(t.to(x0.device), seq_len=seq_len).view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - sigma) * x0.float() + sigma * noise.float()
        return xt.to(x0.dtype)

    def model_timestep(self, t, *, seq_len=None):
        return self.sigma(t, seq_len=seq_len) * self.timestep_scale

    def describe(self, seq_len=None):
        out = {"noise_process": self.kind, "timestep_scale": self.timestep_scale}
        if self.dynamic:
            out["shift"] = "dynamic"
            if seq_len is not None:
                out["mu"] = self.mu(seq_len)
                out["shift_factor"] = math.exp(out["mu"])
        else:
            out["shift"] = float(self.scheduler.config.shift)
        return out


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma={sigma} is outside [0, 1] (0 = clean, 1 = pure noise)")
    return sigma
