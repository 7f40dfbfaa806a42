"""Matching keypoints between two dense feature maps: nearest neighbour, window soft-argmax, mutual NN.

Conventions (the same everywhere in cleandift):

* Points are ``(x, y)`` in pixel-index coordinates of an image of ``(H, W)`` pixels: pixel centres
  at integers, ``(0, 0)`` the centre of the top-left pixel (:mod:`cleandift.images`).
* A feature map ``(C, h, w)`` covers its whole frame with ``align_corners=False`` geometry: cell
  ``(i, j)`` is centred at ``((j + 0.5) * W / w - 0.5, (i + 0.5) * H / h - 0.5)``. Sampling it at a
  point bilinearly is *exactly* what indexing ``F.interpolate(map, (H, W), mode="bilinear",
  align_corners=False)`` at ``[y, x]`` gives (DIFT's "upsample to the image size").
* Similarity is cosine (vectors are L2-normalised here, whatever the descriptor returns).
* ``src_size`` / ``trg_size`` are the ``(H, W)`` of the frames the points live in (the original
  images in an evaluation). If the maps cover another frame (a resized / padded model input), pass
  the :class:`~cleandift.images.ResizeTransform` from the point frame to the map frame; points are
  mapped in and predictions mapped back, so results are always in the original target frame.

Candidate grids for the target (``grid``):

* ``pixels`` -- every integer pixel of the target frame; its descriptor is the bilinear sample of
  the target map there (DIFT: upsample to the image, cosine, argmax). The ``(C, H, W)`` upsampled
  map is never materialised: upsampling is linear and separable, so the dot products are the
  upsampled ``(N, h, w)`` dot maps and the norms an exact quadratic form in the dot products of
  neighbouring cells (:func:`neighbour_gram`); computed in float64, in chunks of rows.
* ``cells`` -- the cell centres of the target map (SD-DINO / TLFR: patch centres).

Methods (``method``):

* ``argmax`` -- the best candidate (ties: the first in row-major order).
* ``soft-argmax`` -- TLFR's window soft-argmax: take the argmax, keep the candidates within
  ``+-window`` grid steps of it (``(2 window + 1)^2``, clipped at the border), softmax of
  ``similarity / temperature`` over them, predict the expected coordinate (default window 5 cells,
  temperature 0.02).

Source descriptors (``source``): ``bilinear`` samples the source map at the keypoint (DIFT);
``cell`` takes the cell that contains it (TLFR's ``int(xy * h / H)``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..features import sample_points
from ..images import ResizeTransform

Method = Literal["argmax", "soft-argmax"]
Grid = Literal["pixels", "cells"]
Source = Literal["bilinear", "cell"]
METHODS: tuple[str, ...] = ("argmax", "soft-argmax")
GRIDS: tuple[str, ...] = ("pixels", "cells")
SOURCES: tuple[str, ...] = ("bilinear", "cell")
#: Upper bound on values materialised per chunk of target rows of the pixel grid (~2 x N x rows x W).
CHUNK_FLOATS = 1 << 24


# ---------------------------------------------------------------------------------------------- geometry
def cell_centers(map_hw: tuple[int, int], frame_hw: tuple[int, int], device=None) -> torch.Tensor:
    """``(h * w, 2)`` pixel-index ``(x, y)`` cell centres of an ``(h, w)`` map over an ``(H, W)`` frame."""
    h, w = map_hw
    big_h, big_w = frame_hw
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * (big_h / h) - 0.5
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * (big_w / w) - 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def cells_of_points(xy: torch.Tensor, map_hw: tuple[int, int], frame_hw: tuple[int, int]) -> torch.Tensor:
    """Row-major index of the cell containing each point ``(N, 2)`` (clamped to the map)."""
    h, w = map_hw
    big_h, big_w = frame_hw
    col = torch.floor((xy[:, 0].float() + 0.5) * (w / big_w)).long().clamp(0, w - 1)
    row = torch.floor((xy[:, 1].float() + 0.5) * (h / big_h)).long().clamp(0, h - 1)
    return row * w + col


def _map_frame(size: tuple[int, int], transform: ResizeTransform | None) -> tuple[int, int]:
    """``(H, W)`` of the frame the map covers."""
    return (transform.out_h, transform.out_w) if transform is not None else (int(size[0]), int(size[1]))


def _to_map(xy: torch.Tensor, transform: ResizeTransform | None) -> torch.Tensor:
    return transform.to_model(xy).to(xy.device) if transform is not None else xy.float()


def _to_points(xy: torch.Tensor, transform: ResizeTransform | None) -> torch.Tensor:
    return transform.to_original(xy).to(xy.device) if transform is not None else xy.float()


# ---------------------------------------------------------------------------------------------- descriptors
def source_descriptors(src_feats: torch.Tensor, src_xy: torch.Tensor, src_size: tuple[int, int],
                       src_transform: ResizeTransform | None = None, source: Source = "bilinear"
                       ) -> torch.Tensor:
    """Unit-length descriptors ``(N, C)`` of the source points (see module docstring for ``source``)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    frame = _map_frame(src_size, src_transform)
    xy = _to_map(src_xy.float(), src_transform).to(src_feats.device)
    if source == "bilinear":
        vecs = sample_points(src_feats[None].float(), xy[None], frame)[0]
    else:
        idx = cells_of_points(xy, tuple(src_feats.shape[-2:]), frame)
        vecs = src_feats.float().flatten(1).t()[idx]
    return F.normalize(vecs, dim=-1)


def _axis(points: torch.Tensor, n_cells: int, frame_len: int) -> tuple[torch.Tensor, ...]:
    """Bilinear taps along one axis: cells ``i0, i1`` and weights ``w0, w1`` for frame positions ``points``.

    Same arithmetic as ``grid_sample(align_corners=False, padding_mode="border")``: map coordinate
    ``u = (p + 0.5) * n / L - 0.5`` clamped to ``[0, n - 1]``.
    """
    u = ((points.double() + 0.5) * (n_cells / frame_len) - 0.5).clamp(0, n_cells - 1)
    i0 = u.floor().long()
    i1 = (i0 + 1).clamp(max=n_cells - 1)
    frac = u - i0
    return i0, i1, 1 - frac, frac


def neighbour_gram(feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dot products of each cell with itself and its right / lower / diagonal neighbours (float64, (h, w)).

    ``S[i, j] = |f_ij|^2``, ``H = <f_ij, f_i,j+1>``, ``V = <f_ij, f_i+1,j>``, ``D1 = <f_ij, f_i+1,j+1>``,
    ``D2 = <f_i,j+1, f_i+1,j>`` (zero where the neighbour does not exist). The squared norm of a
    bilinear blend of four neighbouring cells is a quadratic form in these, which is how
    :func:`match_points` gets exact norms of the upsampled map without ever building it.
    """
    f = feats.double()
    _, h, w = f.shape
    out = {"S": (f * f).sum(0)}
    for name, a, b in (("H", f[:, :, :-1], f[:, :, 1:]), ("V", f[:, :-1], f[:, 1:]),
                       ("D1", f[:, :-1, :-1], f[:, 1:, 1:]), ("D2", f[:, :-1, 1:], f[:, 1:, :-1])):
        full = f.new_zeros(h, w)
        dots = (a * b).sum(0)
        full[:dots.shape[0], :dots.shape[1]] = dots
        out[name] = full
    return out


def _pixel_cosines(queries: torch.Tensor, trg_feats: torch.Tensor, map_rows: tuple[torch.Tensor, ...],
                   map_cols: tuple[torch.Tensor, ...], gram: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cosine of each query with the bilinearly upsampled target at the given pixels: ``(N, R, W)``.

    ``map_rows`` / ``map_cols`` are the bilinear taps (:func:`_axis`) of the pixel rows and columns.
    Upsampling is linear and separable, so ``<q, up(f)>`` is the upsampled ``<q, f>`` map and
    ``|up(f)|^2`` a 10-term quadratic form in :func:`neighbour_gram` -- exact, and
    ``O(N H W + C h w)`` instead of ``O(C H W)``. (A clamped second tap always has weight 0.)
    """
    r0, r1, a0, a1 = map_rows
    c0, c1, b0, b1 = map_cols
    dots = torch.einsum("nc,chw->nhw", queries.double(), trg_feats.double())  # (N, h, w)

    def at(m: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return m.index_select(-2, r).index_select(-1, c)

    def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a[:, None] * b[None, :]

    num = (outer(a0, b0) * at(dots, r0, c0) + outer(a0, b1) * at(dots, r0, c1) +
           outer(a1, b0) * at(dots, r1, c0) + outer(a1, b1) * at(dots, r1, c1))
    s, hh, v, d1, d2 = gram["S"], gram["H"], gram["V"], gram["D1"], gram["D2"]
    norm2 = (outer(a0 * a0, b0 * b0) * at(s, r0, c0) + outer(a0 * a0, b1 * b1) * at(s, r0, c1) +
             outer(a1 * a1, b0 * b0) * at(s, r1, c0) + outer(a1 * a1, b1 * b1) * at(s, r1, c1) +
             2 * outer(a0 * a0, b0 * b1) * at(hh, r0, c0) + 2 * outer(a1 * a1, b0 * b1) * at(hh, r1, c0) +
             2 * outer(a0 * a1, b0 * b0) * at(v, r0, c0) + 2 * outer(a0 * a1, b1 * b1) * at(v, r0, c1) +
             2 * outer(a0 * a1, b0 * b1) * (at(d1, r0, c0) + at(d2, r0, c0)))
    return num / norm2.clamp_min(1e-24).sqrt()


# ---------------------------------------------------------------------------------------------- matching
def match_points(src_feats: torch.Tensor, trg_feats: torch.Tensor, src_xy: torch.Tensor,
                 src_size: tuple[int, int], trg_size: tuple[int, int], method: Method = "argmax",
                 grid: Grid = "pixels", source: Source = "bilinear", window: int = 5,
                 temperature: float = 0.02, src_transform: ResizeTransform | None = None,
                 trg_transform: ResizeTransform | None = None,
                 return_scores: bool = False):
    """Predict where source keypoints land in the target image.

    Args:
        src_feats, trg_feats: ``(C, h, w)`` maps (or ``(1, C, h, w)``) of the two images.
        src_xy: ``(N, 2)`` source points in the source point frame of ``src_size = (H, W)``.
        src_size, trg_size: ``(H, W)`` of the point frames (the original images).
        method, grid, source, window, temperature: see the module docstring.
        src_transform, trg_transform: point frame -> frame covered by the map (``None``: the map
            covers the point frame itself).
        return_scores: also return the cosine similarity of the argmax candidate ``(N,)``.
    Returns:
        ``(N, 2)`` predictions in the target point frame (``(pred, scores)`` with ``return_scores``).

    >>> import torch
    >>> f = torch.randn(8, 6, 6)
    >>> pts = torch.tensor([[12.0, 20.0], [30.0, 7.0]])
    >>> match_points(f, f, pts, (48, 48), (48, 48)).tolist()   # identical images -> identity
    [[12.0, 20.0], [30.0, 7.0]]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if temperature <= 0 or window < 0:
        raise ValueError(f"need temperature > 0 and window >= 0, got {temperature} and {window}")
    src_feats, trg_feats = _chw(src_feats), _chw(trg_feats)
    if src_feats.shape[0] != trg_feats.shape[0]:
        raise ValueError(f"source and target descriptors differ in channels: "
                         f"{src_feats.shape[0]} vs {trg_feats.shape[0]}")
    src_xy = torch.as_tensor(src_xy, dtype=torch.float32).reshape(-1, 2)
    if src_xy.shape[0] == 0:
        empty = torch.zeros(0, 2)
        return (empty, torch.zeros(0)) if return_scores else empty
    queries = source_descriptors(src_feats, src_xy, src_size, src_transform, source)
    if grid == "cells":
        pred, scores = _match_cells(queries, trg_feats, trg_size, trg_transform, method, window, temperature)
    else:
        pred, scores = _match_pixels(queries, trg_feats, trg_size, trg_transform, method, window, temperature)
    pred = pred.cpu()
    return (pred, scores.cpu()) if return_scores else pred


def _chw(feats: torch.Tensor) -> torch.Tensor:
    if feats.ndim == 4 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 3:
        raise ValueError(f"expected a (C, h, w) feature map, got {tuple(feats.shape)}")
    return feats


def _match_cells(queries, trg_feats, trg_size, transform, method, window, temperature):
    c, h, w = trg_feats.shape
    frame = _map_frame(trg_size, transform)
    cells = F.normalize(trg_feats.float().reshape(c, -1), dim=0)
    sim = (queries.to(cells.device) @ cells).view(-1, h, w)  # (N, h, w)
    if method == "argmax":
        best = sim.flatten(1).argmax(1)
        grid_xy = torch.stack([best % w, best // w], -1).float()
        scores = sim.flatten(1).gather(1, best[:, None])[:, 0]
    else:
        grid_xy, scores = window_soft_argmax(sim, window, temperature)
    centres = _grid_to_frame(grid_xy, (h, w), frame)
    return _to_points(centres, transform), scores


def _grid_to_frame(grid_xy: torch.Tensor, map_hw: tuple[int, int], frame: tuple[int, int]) -> torch.Tensor:
    """(Fractional) cell coordinates ``(col, row)`` -> pixel-index points of the frame."""
    h, w = map_hw
    scale = grid_xy.new_tensor([frame[1] / w, frame[0] / h])
    return (grid_xy + 0.5) * scale - 0.5


def _match_pixels(queries, trg_feats, trg_size, transform, method, window, temperature):
    big_h, big_w = int(trg_size[0]), int(trg_size[1])
    frame_h, frame_w = _map_frame(trg_size, transform)
    _, h, w = trg_feats.shape
    device = trg_feats.device
    # every target pixel's position in the map frame, per axis (all supported transforms are per-axis affine)
    xs = torch.arange(big_w, dtype=torch.float32, device=device)
    ys = torch.arange(big_h, dtype=torch.float32, device=device)
    if transform is not None:
        xs = _to_map(torch.stack([xs, torch.zeros_like(xs)], -1), transform)[:, 0].to(device)
        ys = _to_map(torch.stack([torch.zeros_like(ys), ys], -1), transform)[:, 1].to(device)
    map_cols, map_rows = _axis(xs, w, frame_w), _axis(ys, h, frame_h)
    gram = neighbour_gram(trg_feats)
    n = queries.shape[0]
    queries = queries.to(device)
    best_val = torch.full((n,), -float("inf"), dtype=torch.float64, device=device)
    best_idx = torch.zeros(n, dtype=torch.long, device=device)
    step = max(1, CHUNK_FLOATS // max(1, 2 * n * big_w))
    for start in range(0, big_h, step):
        rows = slice(start, min(start + step, big_h))
        chunk_rows = tuple(t[rows] for t in map_rows)
        sim = _pixel_cosines(queries, trg_feats, chunk_rows, map_cols, gram).flatten(1)
        val, idx = sim.max(1)
        better = val > best_val  # strict: ties keep the earlier (row-major first) pixel
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start * big_w, best_idx)
    argmax_xy = torch.stack([best_idx % big_w, best_idx // big_w], -1).float()
    frame = (frame_h, frame_w)
    if method == "argmax":
        return argmax_xy, best_val.float()
    return _pixel_soft_argmax(queries, trg_feats, argmax_xy, (big_h, big_w), frame, transform, window,
                              temperature), best_val.float()


def _pixel_soft_argmax(queries, trg_feats, argmax_xy, size, frame, transform, window, temperature):
    """Soft-argmax over the ``(2 window + 1)^2`` target pixels around each query's argmax."""
    big_h, big_w = size
    offsets = torch.arange(-window, window + 1, device=argmax_xy.device, dtype=torch.float32)
    oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
    out = []
    for q, centre in zip(queries, argmax_xy):
        xy = torch.stack([centre[0] + ox.reshape(-1), centre[1] + oy.reshape(-1)], -1)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < big_w) & (xy[:, 1] >= 0) & (xy[:, 1] < big_h)
        xy = xy[inside]
        vecs = sample_points(trg_feats[None].float(), _to_map(xy, transform)[None], frame)[0]
        vecs = F.normalize(vecs, dim=-1)
        weights = torch.softmax((vecs @ q) / temperature, dim=0)
        out.append((weights[:, None] * xy).sum(0))
    return torch.stack(out)


def window_soft_argmax(sim: torch.Tensor, window: int = 5, temperature: float = 0.02
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """TLFR's window soft-argmax on similarity maps ``(N, h, w)``.

    Returns fractional grid coordinates ``(N, 2)`` as ``(col, row)`` and the peak similarity ``(N,)``.
    Only the ``(2 window + 1)^2`` cells around each argmax (clipped at the border) enter the softmax
    of ``sim / temperature``; the prediction is their softmax-weighted mean position.
    """
    n, h, w = sim.shape
    flat = sim.reshape(n, -1)
    peak, best = flat.max(1)
    rows = torch.arange(h, device=sim.device).view(1, h, 1)
    cols = torch.arange(w, device=sim.device).view(1, 1, w)
    br, bc = (best // w).view(n, 1, 1), (best % w).view(n, 1, 1)
    inside = ((rows - br).abs() <= window) & ((cols - bc).abs() <= window)  # (N, h, w)
    logits = (sim / temperature).masked_fill(~inside, -float("inf"))
    weights = torch.softmax(logits.reshape(n, -1), dim=1).view(n, h, w)
    x = (weights * cols.float()).sum((1, 2))
    y = (weights * rows.float()).sum((1, 2))
    return torch.stack([x, y], -1), peak


# ---------------------------------------------------------------------------------------------- mutual NN
def mutual_nearest_neighbors(feats_a: torch.Tensor, feats_b: torch.Tensor, chunk: int = 4096
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell pairs that are each other's cosine nearest neighbour.

    Args:
        feats_a, feats_b: ``(C, h, w)`` maps.
        chunk: rows of the similarity matrix computed at once (bounds memory at ``chunk x h_b w_b``).
    Returns:
        ``(idx_a, idx_b, sim)``: row-major cell indices ``(M,)`` into each map and their cosine
        similarity. Use :func:`cell_centers` to turn indices into points.
    """
    a = F.normalize(_chw(feats_a).float().flatten(1), dim=0)  # (C, Na)
    b = F.normalize(_chw(feats_b).float().flatten(1), dim=0).to(a.device)  # (C, Nb)
    a_to_b, a_val = _chunked_argmax(a, b, chunk)
    b_to_a, _ = _chunked_argmax(b, a, chunk)
    idx_a = torch.arange(a.shape[1], device=a.device)
    mutual = b_to_a[a_to_b] == idx_a
    return idx_a[mutual], a_to_b[mutual], a_val[mutual]


def _chunked_argmax(q: torch.Tensor, k: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column of ``q`` ``(C, Nq)`` the index and value of its best column in ``k``."""
    idx, val = [], []
    for start in range(0, q.shape[1], chunk):
        v, i = (q[:, start:start + chunk].t() @ k).max(1)
        idx.append(i)
        val.append(v)
    return torch.cat(idx), torch.cat(val)
