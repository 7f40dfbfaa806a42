"""Operations on feature maps: upsampling, sampling at points, normalisation.

All take ``(B, C, h, w)`` maps. Points follow the pixel convention of :mod:`cleandift.images`:
``(x, y)`` in pixel-index coordinates of an image of ``(H, W)`` pixels, pixel centres at integers.
With that convention sampling a low-resolution map at ``(x, y)`` equals indexing the map bilinearly
upsampled to ``(H, W)`` (``align_corners=False``) at ``[y, x]`` -- the DIFT protocol -- without ever
materialising the upsampled map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_normalize(feats: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Unit-length feature vectors along ``dim`` (channels by default)."""
    return F.normalize(feats, dim=dim, eps=eps)


def upsample(feats: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``(B, C, h, w)`` maps to ``size = (H, W)`` (bilinear, ``align_corners=False``)."""
    if mode == "nearest":
        return F.interpolate(feats, size=size, mode="nearest")
    return F.interpolate(feats, size=size, mode=mode, align_corners=False)


def points_to_grid(xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel-index ``(x, y)`` points of an ``(H, W)`` image -> ``grid_sample`` coordinates in ``[-1, 1]``."""
    h, w = image_size
    scale = xy.new_tensor([2.0 / w, 2.0 / h])
    return (xy.float() + 0.5) * scale - 1.0


def sample_points(feats: torch.Tensor, xy: torch.Tensor, image_size: tuple[int, int],
                  mode: str = "bilinear") -> torch.Tensor:
    """Feature vectors at points.

    Args:
        feats: ``(B, C, h, w)`` feature maps of images of ``image_size = (H, W)`` pixels.
        xy: ``(B, N, 2)`` or ``(N, 2)`` points (shared by the batch) in pixel-index coordinates.
        image_size: the pixel size of the frame the points live in.
    Returns:
        ``(B, N, C)`` sampled features (border values are replicated outside the image).
    """
    if xy.ndim == 2:
        xy = xy.unsqueeze(0).expand(feats.shape[0], -1, -1)
    grid = points_to_grid(xy.to(feats.device), image_size).to(feats.dtype).unsqueeze(2)  # (B, N, 1, 2)
    out = F.grid_sample(feats, grid, mode=mode, padding_mode="border", align_corners=False)  # (B, C, N, 1)
    return out.squeeze(-1).transpose(1, 2)


def flatten_hw(feats: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h*w, C)`` (channels last, the layout the heads and loss use)."""
    return feats.flatten(2).transpose(1, 2)
