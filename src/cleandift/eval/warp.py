"""Synthetic dense correspondence: an image against a strong random warp of itself.

Where no keypoint-annotated pairs exist (the offline Fashion-MNIST model), correspondence can still be
measured exactly: warp each image with a random transform whose ground truth is known by construction,
then ask the features where each source point went.

A warp is a continuous map from target to source coordinates (``grid_sample`` convention, normalised
``[-1, 1]`` with ``align_corners=False``): a homography -- rotation, scale, translation and perspective
terms -- followed by an elastic displacement (a random ``k x k`` field of control vectors, interpolated
bilinearly). Warping an image samples this map at the target pixel centres. Ground truth for a source
keypoint is the target point the map sends onto it, found by evaluating the same continuous map on a grid
``refine`` times finer than the image (error <= ~1/(2 * refine) px) -- no approximate inverse formula.
Points whose image leaves the frame are marked invalid.

Points are ``(x, y)`` pixel-index coordinates (pixel centres at integers), as everywhere in cleandift.
PCK here uses the image threshold: a prediction is correct within ``alpha * max(H, W)`` pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..features import sample_points
from .pck import pck


@dataclass(frozen=True)
class WarpConfig:
    """How strong the random warps are (defaults: the offline replication protocol of issue 5)."""

    max_rotation_deg: float = 45.0
    scale_range: tuple[float, float] = (0.7, 1.3)
    max_translation: float = 0.15  # fraction of the image side
    max_perspective: float = 0.15  # projective terms in normalised coordinates
    elastic_alpha: float = 0.06  # std of the control displacements, normalised units (0.06 ~ 1 px at 32 px)
    elastic_grid: int = 5  # control points per side

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Warp:
    """One random warp: forward homography (source -> target, normalised coords) + elastic field."""

    homography: torch.Tensor  # (3, 3)
    elastic: torch.Tensor  # (2, k, k) control displacements added to the source coordinate

    def source_coords(self, target: torch.Tensor) -> torch.Tensor:
        """Normalised target points ``(..., 2)`` -> the source points they sample ``(..., 2)``."""
        flat = target.reshape(-1, 2).double()
        inv = torch.linalg.inv(self.homography.double())
        homog = torch.cat([flat, torch.ones_like(flat[:, :1])], dim=1) @ inv.T
        src = homog[:, :2] / homog[:, 2:].clamp_min(1e-6)
        grid = flat.float().view(1, 1, -1, 2)
        disp = F.grid_sample(self.elastic[None].float(), grid, mode="bilinear", align_corners=True)[0, :, 0].T
        return (src + disp.double()).float().reshape(target.shape)


def random_warp(config: WarpConfig, generator: torch.Generator) -> Warp:
    """Draw a warp: uniform rotation, scale, translation, perspective; Gaussian elastic controls."""
    def uniform(lo: float, hi: float) -> float:
        return float(torch.empty(()).uniform_(lo, hi, generator=generator))

    angle = math.radians(uniform(-config.max_rotation_deg, config.max_rotation_deg))
    scale = uniform(*config.scale_range)
    tx, ty = (uniform(-2 * config.max_translation, 2 * config.max_translation) for _ in range(2))
    px, py = (uniform(-config.max_perspective, config.max_perspective) for _ in range(2))
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    homography = torch.tensor([[c, -s, tx], [s, c, ty], [px, py, 1.0]])
    k = config.elastic_grid
    elastic = torch.randn(2, k, k, generator=generator) * config.elastic_alpha
    return Warp(homography, elastic)


def pixel_centres(size: tuple[int, int], refine: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``(H*r, W*r, 2)`` centres of a grid ``refine`` times finer, and their pixel ``(x, y)``."""
    h, w = size[0] * refine, size[1] * refine
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    norm = torch.stack([(xs + 0.5) * 2 / w - 1, (ys + 0.5) * 2 / h - 1], dim=-1)
    pix = torch.stack([(xs + 0.5) / refine - 0.5, (ys + 0.5) / refine - 0.5], dim=-1)
    return norm, pix


def warp_image(image: torch.Tensor, warp: Warp, background: float = -1.0) -> torch.Tensor:
    """``(C, H, W)`` -> the warped image; regions from outside the source get ``background``."""
    norm, _ = pixel_centres(tuple(image.shape[-2:]))
    grid = warp.source_coords(norm)[None]
    out = F.grid_sample((image - background)[None].float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[0] + background


def forward_points(warp: Warp, src_xy: torch.Tensor, size: tuple[int, int], refine: int = 4
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where source points ``(K, 2)`` land in the target: ``(trg_xy (K, 2), valid (K,))``.

    A point is valid when some target location inside the frame maps within half a fine cell of it.
    """
    norm, pix = pixel_centres(size, refine)
    src_of_target = warp.source_coords(norm).reshape(-1, 2)  # (H*W*r*r, 2)
    h, w = size
    src_norm = torch.stack([(src_xy[:, 0] + 0.5) * 2 / w - 1, (src_xy[:, 1] + 0.5) * 2 / h - 1], dim=-1)
    dist = torch.cdist(src_norm, src_of_target)  # (K, M)
    best, idx = dist.min(dim=1)
    tolerance = 1.0 / (refine * min(h, w)) * 1.5  # 0.75 fine cells, in normalised units
    return pix.reshape(-1, 2)[idx], best <= tolerance


@dataclass
class WarpPairs:
    """Source images, their warped targets and ground-truth keypoints (``valid`` marks usable points)."""

    source: torch.Tensor  # (N, C, H, W)
    target: torch.Tensor  # (N, C, H, W)
    src_xy: torch.Tensor  # (N, K, 2)
    trg_xy: torch.Tensor  # (N, K, 2)
    valid: torch.Tensor  # (N, K) bool

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.source.shape[-2:])


def make_warp_pairs(images: torch.Tensor, config: WarpConfig | None = None, n_points: int = 16, seed: int = 0,
                    fg_threshold: float = -0.6, background: float = -1.0, refine: int = 4) -> WarpPairs:
    """Warp every image ``(N, C, H, W)`` in ``[-1, 1]`` and sample ``n_points`` keypoints on its object.

    Keypoints are drawn among source pixels brighter than ``fg_threshold`` (the object, not the
    background) whose image stays inside the target frame; images with fewer such pixels get
    invalid slots.
    """
    config = config or WarpConfig()
    g = torch.Generator().manual_seed(seed)
    size = tuple(images.shape[-2:])
    n = images.shape[0]
    targets = torch.empty_like(images, dtype=torch.float32)
    src_xy = torch.zeros(n, n_points, 2)
    trg_xy = torch.zeros(n, n_points, 2)
    valid = torch.zeros(n, n_points, dtype=torch.bool)
    for i in range(n):
        warp = random_warp(config, g)
        targets[i] = warp_image(images[i].float(), warp, background)
        fg = (images[i].float().mean(0) > fg_threshold).nonzero()  # (M, 2) as (y, x)
        if len(fg) == 0:
            continue
        candidates = fg[torch.randperm(len(fg), generator=g)[: 4 * n_points]].flip(1).float()
        gt, ok = forward_points(warp, candidates, size, refine)
        keep = ok.nonzero().flatten()[:n_points]
        src_xy[i, : len(keep)] = candidates[keep]
        trg_xy[i, : len(keep)] = gt[keep]
        valid[i, : len(keep)] = True
    return WarpPairs(images.float(), targets, src_xy, trg_xy, valid)


def predict_matches(src_feats: torch.Tensor, trg_feats: torch.Tensor, src_xy: torch.Tensor,
                    image_size: tuple[int, int]) -> torch.Tensor:
    """DIFT matching in a batch: source descriptor bilinearly sampled at each point, target map upsampled
    to the image size (bilinear), cosine, argmax. ``(N, C, h, w)`` maps, ``(N, K, 2)`` points -> ``(N, K, 2)``.
    """
    h, w = image_size
    queries = F.normalize(sample_points(src_feats.float(), src_xy, image_size), dim=-1)  # (N, K, C)
    trg = F.interpolate(trg_feats.float(), size=(h, w), mode="bilinear", align_corners=False)
    trg = F.normalize(trg.flatten(2), dim=1)  # (N, C, H*W)
    best = torch.bmm(queries, trg).argmax(dim=-1)  # (N, K)
    return torch.stack([best % w, best // w], dim=-1).float()


def warp_pck(pred_xy: torch.Tensor, pairs: WarpPairs, alphas: tuple[float, ...] = (0.1, 0.05)) -> dict[str, float]:
    """Per-point PCK (a fraction in [0, 1]) over valid keypoints, threshold ``alpha * max(H, W)``."""
    side = float(max(pairs.image_size))
    return {f"pck@{a:.2f}": pck(pred_xy, pairs.trg_xy, side, alpha=a, valid=pairs.valid) for a in alphas}


def nothing_moves(pairs: WarpPairs, alphas: tuple[float, ...] = (0.1, 0.05)) -> dict[str, float]:
    """The trivial baseline "every point stays where it was": low PCK means the warp is strong enough."""
    return warp_pck(pairs.src_xy.clone(), pairs, alphas)
