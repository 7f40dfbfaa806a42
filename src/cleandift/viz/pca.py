"""PCA colourings of dense feature maps (CleanDIFT Fig. 16, DINOv2 Fig. 1).

Recipe (the authors' answer in CompVis/cleandift#15): fit a PCA on all feature vectors, threshold
the **first** principal component to split foreground from background, and show the **next three**
components as RGB, min-max normalised over the foreground; background is black. With several maps
the PCA is fit jointly, so the same colour means the same feature direction in every image -- that
is what makes corresponding parts light up alike.

Sign of the first component: a PCA axis has no intrinsic sign, so it is oriented so that the
*image border* (the outer ring of cells, usually background) scores low (``orient="border"``,
default); ``"minority"`` instead makes the smaller side the foreground, ``"none"`` keeps the
deterministic SVD sign (largest loading positive, as for every other component).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from ..eval.fusion import principal_axes

Orient = Literal["border", "minority", "none"]
ORIENTS: tuple[str, ...] = ("border", "minority", "none")


class PCAImage(NamedTuple):
    """Result of :func:`pca_rgb`: colours in ``[0, 1]`` and the foreground mask (batch dim as the input)."""

    rgb: torch.Tensor  # (B, h, w, 3) or (h, w, 3), float32
    foreground: torch.Tensor  # (B, h, w) or (h, w), bool


def pca_rgb(feats: torch.Tensor, fg_threshold: float | None = 0.0, *, orient: Orient = "border",
            refit_foreground: bool = False) -> PCAImage:
    """Colour feature maps by PCA, with the first component as a foreground mask.

    Args:
        feats: ``(C, h, w)`` or ``(B, C, h, w)``; with a batch the PCA is shared by all maps.
        fg_threshold: foreground = first-component score ``> fg_threshold``, in units of that
            component's standard deviation (0 = the recipe's "threshold at 0"). ``None`` skips the
            split: everything is foreground and components 1-3 become RGB.
        orient: how the sign of the first component is chosen (module docstring).
        refit_foreground: fit a second PCA on the foreground vectors only and use *its* first three
            components (DINOv2's Fig. 1 variant) instead of components 2-4 of the global PCA.
    Returns:
        :class:`PCAImage` -- ``rgb`` in ``[0, 1]`` (background exactly 0) and the boolean mask.
    """
    if orient not in ORIENTS:
        raise ValueError(f"orient must be one of {', '.join(ORIENTS)}, got {orient!r}")
    single = feats.ndim == 3
    maps = feats.unsqueeze(0) if single else feats
    if maps.ndim != 4:
        raise ValueError(f"feats must be (C, h, w) or (B, C, h, w), got {tuple(feats.shape)}")
    b, c, h, w = maps.shape
    x = maps.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, c)
    mean, axes = principal_axes(x, 4)
    scores = (x - mean) @ axes.T  # (N, 4)
    if fg_threshold is None:
        fg = torch.ones(x.shape[0], dtype=torch.bool)
        colour = scores[:, :3]
    else:
        first = _oriented_first(scores[:, 0], (b, h, w), orient)
        fg = first > fg_threshold
        colour = _foreground_colours(x, fg, scores, refit_foreground)
    rgb = torch.zeros(x.shape[0], 3)
    if fg.any():
        rgb[fg] = _minmax(colour[fg])
    rgb = rgb.view(b, h, w, 3)
    mask = fg.view(b, h, w)
    return PCAImage(rgb[0], mask[0]) if single else PCAImage(rgb, mask)


def _oriented_first(first: torch.Tensor, shape: tuple[int, int, int], orient: Orient) -> torch.Tensor:
    """First-component scores in std units, signed so that the background scores low."""
    std = first.std()
    first = first / std if std > 0 else first
    if orient == "none":
        return first
    sign = 0.0
    if orient == "border":
        grid = first.view(shape)
        border = torch.ones(shape[1:], dtype=torch.bool)
        if shape[1] > 2 and shape[2] > 2:
            border[1:-1, 1:-1] = False
            sign = -float(torch.sign(grid[:, border].mean()))
    if sign == 0.0:  # "minority", or no usable border: the smaller side is the foreground
        sign = -1.0 if (first > 0).float().mean() > 0.5 else 1.0
    return first * sign


def _foreground_colours(x: torch.Tensor, fg: torch.Tensor, scores: torch.Tensor, refit: bool) -> torch.Tensor:
    if not refit or int(fg.sum()) < 2:
        return scores[:, 1:4]
    mean, axes = principal_axes(x[fg], 3)
    return (x - mean) @ axes.T


def _minmax(values: torch.Tensor) -> torch.Tensor:
    """Per-column min-max to ``[0, 1]`` (a constant column maps to 0.5)."""
    lo = values.min(dim=0).values
    hi = values.max(dim=0).values
    span = hi - lo
    out = (values - lo) / torch.where(span > 0, span, torch.ones_like(span))
    out[:, span <= 0] = 0.5
    return out.clamp(0.0, 1.0)


def save_rgb_png(rgb: torch.Tensor | np.ndarray, path: str | Path, size: int | tuple[int, int] | None = None,
                 resample: Literal["nearest", "bilinear"] = "nearest") -> Path:
    """Write an ``(h, w, 3)`` image in ``[0, 1]`` as PNG, optionally resized to ``size`` (W, H).

    ``nearest`` (default) keeps feature cells as crisp blocks, which shows the true resolution.
    """
    arr = rgb.detach().float().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"rgb must be (h, w, 3), got {arr.shape}")
    img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    if size is not None:
        size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        img = img.resize(size, Image.NEAREST if resample == "nearest" else Image.BILINEAR)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def save_pca_png(feats: torch.Tensor, path: str | Path, size: int | tuple[int, int] | None = None,
                 fg_threshold: float | None = 0.0, **kwargs) -> Path:
    """:func:`pca_rgb` of one ``(C, h, w)`` map written as PNG (see :func:`save_rgb_png`)."""
    if feats.ndim != 3:
        raise ValueError(f"save_pca_png takes one (C, h, w) map, got {tuple(feats.shape)}; "
                         "colour a batch jointly with pca_rgb and save each map with save_rgb_png")
    return save_rgb_png(pca_rgb(feats, fg_threshold, **kwargs).rgb, path, size)
