"""Optional clean-ups of diffusion-transformer features, after DiTF (NeurIPS'25); both off by default.

Raw DiT block outputs are the residual stream: a few "massive activation" channels dwarf all others and
dominate every cosine similarity, and the scale of the stream is only made usable by the AdaLN
normalisation of the next layer. DiTF reports Flux correspondence going from 29.9 to 65.3 PCK by reading
features through that normalisation and to 67.1 by also removing the massive channels. Two named options:

* ``readout="adaln"`` (:meth:`DiffusionBackbone.readout_taps`): read a block's output as the model itself
  reads it next -- the output of the following block's AdaLN-modulated normalisation (``norm1`` of an SD3 /
  Flux double block, ``norm`` of a Flux single block, the final ``norm_out`` after the last block), i.e.
  ``(1 + scale) * LayerNorm(h) + shift`` with the timestep-conditioned scale and shift. Families whose
  modulation happens inside the block's forward instead of in a module (PixArt) do not offer it.
* ``massive_ratio`` (:func:`suppress_massive_activations`): zero the channels whose RMS over an image's
  positions exceeds ``ratio`` times the median channel RMS of that image -- detected per image from the
  features, never a hard-coded channel list (DiTF names channels 154 and 1446 of FLUX.1-dev).
"""

from __future__ import annotations

import torch

from .errors import ConfigError

READOUTS = ("residual", "adaln")


def suppress_massive_activations(feature: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero massive-activation channels of ``(B, C, h, w)`` maps; returns the maps and the ``(B, C)`` mask zeroed.

    Per image: a feature never depends on the other images of the batch.
    """
    if not ratio > 1:
        raise ConfigError(f"massive-activation ratio must be > 1, got {ratio}")
    rms = feature.float().pow(2).mean(dim=(-2, -1)).sqrt()
    median = rms.median(dim=1, keepdim=True).values.clamp_min(torch.finfo(torch.float32).tiny)
    massive = rms > ratio * median
    return feature.masked_fill(massive[..., None, None], 0), massive


def check_readout(readout: str) -> str:
    if readout not in READOUTS:
        raise ConfigError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    return readout
