"""Top-K mutual nearest-neighbour matches between two images, ranked by a soft cycle-consistency.

Mutual nearest neighbours (:func:`cleandift.eval.matching.mutual_nearest_neighbors`) are cycle-consistent
by construction, so "is it consistent" cannot rank them. The confidence here asks how *surely* it is:
with ``P(b | a) = softmax_b(cos(a, b) / T)`` (and the same from B to A), it is the probability that a
soft walk ``a -> B -> A`` returns to within ``window`` cells of ``a``:

    conf(a) = sum_b P(b | a) * sum_{a' near a} P(a' | b)       in [0, 1]

A distinctive, unambiguous match scores near 1; a match on a repetitive or flat region, whose walk
spreads over many cells, near 0. Computed in chunks of B's cells (memory ``chunk x cells of A``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..eval.matching import cell_centers, mutual_nearest_neighbors
from ..images import ResizeTransform

CYCLE_WINDOW = 1  #: "returns to a": within +-1 cell (a 3x3 neighbourhood)


def cycle_confidence(feats_a: torch.Tensor, feats_b: torch.Tensor, cells_a: torch.Tensor,
                     temperature: float = 0.02, window: int = CYCLE_WINDOW, chunk: int = 2048
                     ) -> torch.Tensor:
    """Soft cycle-consistency (module docstring) of the cells ``cells_a`` (row-major indices) of map A."""
    _, ha, wa = feats_a.shape
    a = F.normalize(feats_a.float().flatten(1), dim=0)  # (C, Na)
    b = F.normalize(feats_b.float().flatten(1), dim=0)  # (C, Nb)
    forward = torch.softmax((a[:, cells_a].t() @ b) / temperature, dim=1)  # (M, Nb): P(b | a)
    back_mass = torch.empty(b.shape[1], cells_a.numel())  # (Nb, M): P(near a | b)
    size = 2 * window + 1
    for start in range(0, b.shape[1], chunk):
        p = torch.softmax((b[:, start:start + chunk].t() @ a) / temperature, dim=1)  # (n, Na)
        near = F.avg_pool2d(p.view(-1, 1, ha, wa), size, stride=1, padding=window) * size**2  # window sums
        back_mass[start:start + chunk] = near.flatten(1)[:, cells_a]
    return (forward * back_mass.t()).sum(1).clamp(0, 1)


def top_mutual_matches(feats_a: torch.Tensor, feats_b: torch.Tensor, transform_a: ResizeTransform,
                       transform_b: ResizeTransform, k: int = 20, radius: float = 0.0,
                       temperature: float = 0.02) -> tuple[list[dict], int]:
    """The ``k`` most confident mutual NN pairs, at least ``radius`` px apart in both images.

    Points are cell centres mapped to original-image pixels; pairs whose cell centre falls outside
    either image (padding) are dropped. Returns the pairs (best first) and how many mutual pairs there were.
    """
    idx_a, idx_b, sim = mutual_nearest_neighbors(feats_a, feats_b)
    pa = _original_points(idx_a, feats_a, transform_a)
    pb = _original_points(idx_b, feats_b, transform_b)
    inside = _inside(pa, transform_a) & _inside(pb, transform_b)
    idx_a, pa, pb, sim = idx_a[inside], pa[inside], pb[inside], sim[inside]
    if idx_a.numel() == 0:
        return [], 0
    conf = cycle_confidence(feats_a, feats_b, idx_a, temperature)
    order = sorted(range(len(conf)), key=lambda i: (-float(conf[i]), -float(sim[i]), int(idx_a[i])))
    kept: list[int] = []
    for i in order:
        if len(kept) >= k:
            break
        if radius > 0 and kept and min(torch.cdist(pa[i][None], pa[kept]).min(),
                                       torch.cdist(pb[i][None], pb[kept]).min()) < radius:
            continue
        kept.append(i)
    pairs = [{"source": _xy(pa[i]), "target": _xy(pb[i]), "similarity": round(float(sim[i]), 4),
              "confidence": round(float(conf[i]), 4)} for i in kept]
    return pairs, int(idx_a.numel())


def _original_points(idx: torch.Tensor, feats: torch.Tensor, transform: ResizeTransform) -> torch.Tensor:
    centres = cell_centers(tuple(feats.shape[-2:]), (transform.out_h, transform.out_w))[idx]
    return transform.to_original(centres)


def _inside(xy: torch.Tensor, transform: ResizeTransform) -> torch.Tensor:
    return ((xy[:, 0] >= -0.5) & (xy[:, 0] <= transform.orig_w - 0.5) &
            (xy[:, 1] >= -0.5) & (xy[:, 1] <= transform.orig_h - 0.5))


def _xy(point: torch.Tensor) -> list[float]:
    return [round(float(point[0]), 2), round(float(point[1]), 2)]
