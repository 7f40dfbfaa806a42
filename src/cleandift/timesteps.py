"""The one timestep convention used everywhere in cleandift.

``t`` is the *training* timestep of the diffusion model: an integer (or float) in ``[0, T-1]``
with ``T = 1000`` for Stable Diffusion, and **larger t means noisier** (``t=0`` is almost clean,
``t=999`` is almost pure noise). This is the index into ``scheduler.alphas_cumprod`` and what the
U-Net receives as its ``timestep`` input; it is *not* an index into ``scheduler.timesteps`` of an
inference schedule (which runs backwards and caused the confusion in several peer projects).
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import TimestepError

DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
#: DIFT's timestep for semantic correspondence; also what the released CleanDIFT students were
#: initialised at (the student's learnable timestep starts here and barely moves).
DIFT_TIMESTEP = 261


def validate_timestep(t: float, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS, what: str = "t",
                      integer: bool = False) -> float:
    """Check that ``t`` is a finite number in ``[0, num_train_timesteps - 1]`` and return it unchanged.

    ``integer=True`` also requires a whole number: noising uses the schedule at integer timesteps, so a
    fractional ``t`` is refused instead of being silently truncated. The student's timestep *input*
    (clean mode) may be fractional: the released students learned 261.x.
    """
    t_max = num_train_timesteps - 1
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TimestepError(f"{what} must be a number in [0, {t_max}], got {t!r}")
    shown = int(t) if float(t).is_integer() else t  # "t=1000", not "t=1000.0", for a CLI float
    if not math.isfinite(t):
        raise TimestepError(f"{what}={t} is not a finite number; pass a timestep in [0, {t_max}] "
                            f"(DIFT uses t={DIFT_TIMESTEP} for correspondence)")
    if not 0 <= t <= t_max:
        raise TimestepError(
            f"{what}={shown} is outside [0, {t_max}]: t is the training timestep of the diffusion model "
            f"(0 = clean, {t_max} = pure noise); DIFT uses t={DIFT_TIMESTEP} for correspondence"
        )
    if integer and t != int(t):
        raise TimestepError(f"{what}={t} is not a whole number: noise is added at integer training timesteps "
                            f"(0, 1, ..., {t_max}); use {math.floor(t)} or {math.ceil(t)}")
    return t


def stratified_timesteps(
    batch_size: int,
    num_bins: int = 3,
    t_min: int = 1,
    t_max: int = 999,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample one integer timestep per bin for every image: shape ``(batch_size, num_bins)``.

    ``[t_min, t_max)`` is split into ``num_bins`` equal bins and ``t_i ~ U(bin_i)`` is floored,
    exactly as the reference training code does (``t_min=1, t_max=999, I=3`` gives bins
    ``[1, 333.67), [333.67, 666.33), [666.33, 999)``). Every image thus sees low, medium and
    high noise in every step.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if not 0 <= t_min < t_max:
        raise TimestepError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    width = (t_max - t_min) / num_bins
    u = torch.rand(batch_size, num_bins, generator=generator, device=device or "cpu")
    offsets = torch.arange(num_bins, device=u.device, dtype=u.dtype) * width
    t = (t_min + offsets + u * width).floor().long()
    return t.clamp_(t_min, t_max - 1).to(device or "cpu")


def bin_edges(num_bins: int = 3, t_min: int = 1, t_max: int = 999) -> list[tuple[float, float]]:
    """The ``[lo, hi)`` edges of the stratification bins (used by tests and docs)."""
    width = (t_max - t_min) / num_bins
    return [(t_min + i * width, t_min + (i + 1) * width) for i in range(num_bins)]
