"""Readouts: how a tap's ``(B, C, h, w)`` map becomes one vector per image for kNN.

The kNN protocol (paper §4.5) says "pooled"; global average pooling (``avg``) is our named default
and what every published table of this project uses. Average pooling throws the object's layout
away, which is exactly what a pixel-kNN keeps, so the other readouts exist to measure how much of a
feature-vs-pixel gap is the model and how much is the readout (``benchmarks/mini_knn_readouts.py``):

* ``max``     -- global max pooling;
* ``avg+max`` -- both, each part L2-normalised so neither dominates the cosine;
* ``avg+std`` -- mean and standard deviation over positions (second-order statistics), same scaling;
* ``grid2`` / ``grid4`` -- average pooling to a 2x2 / 4x4 grid, flattened. These keep coarse layout,
  so they are *not* global pooling: report them as such.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

Readout = Literal["avg", "max", "avg+max", "avg+std", "grid2", "grid4"]
READOUTS: tuple[str, ...] = get_args(Readout)
#: Readouts that discard all spatial layout (the kNN protocol's "globally pooled").
GLOBAL_READOUTS: tuple[str, ...] = ("avg", "max", "avg+max", "avg+std")


def pool_map(feats: torch.Tensor, readout: str = "avg") -> torch.Tensor:
    """``(B, C, h, w) -> (B, D)`` by ``readout`` (see the module docstring); computed in float32."""
    if feats.ndim != 4:
        raise ValueError(f"expected a (B, C, h, w) feature map, got shape {tuple(feats.shape)}")
    x = feats.float()
    if readout == "avg":
        return x.mean(dim=(2, 3))
    if readout == "max":
        return x.amax(dim=(2, 3))
    if readout == "avg+max":
        return _joint(x.mean(dim=(2, 3)), x.amax(dim=(2, 3)))
    if readout == "avg+std":
        return _joint(x.mean(dim=(2, 3)), x.flatten(2).std(dim=2, unbiased=False))
    if readout in ("grid2", "grid4"):
        return F.adaptive_avg_pool2d(x, int(readout[-1])).flatten(1)
    raise ValueError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")


def _joint(*parts: torch.Tensor) -> torch.Tensor:
    """Concatenate L2-normalised parts: each contributes equally to a cosine similarity."""
    return torch.cat([F.normalize(p, dim=1) for p in parts], dim=1)
