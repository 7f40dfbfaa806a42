"""Correspondence figures: matched points on an image pair, and one query point's similarity heatmap.

Both images are drawn side by side on one canvas (top-aligned, a small gap between them) at their
own pixel sizes, so every coordinate is the caller's: ``(x, y)`` in pixel-index coordinates of the
image it belongs to (pixel centres at integers, :mod:`cleandift.images`). Figures are rendered with
matplotlib's Agg canvas directly (no pyplot state, no display) at a fixed ``figsize`` x ``dpi``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..features import sample_points

ImageLike = Image.Image | np.ndarray | torch.Tensor
CORRECT = "#22c55e"  # green
WRONG = "#ef4444"  # red
NEUTRAL = "#facc15"  # yellow: no ground truth given
GAP = 16  # pixels between the two images


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """PIL image, ``(H, W, 3)`` uint8 array or ``(3, H, W)`` tensor in ``[-1, 1]`` → ``(H, W, 3)`` uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W) in [-1, 1], got {tuple(image.shape)}")
        x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
        return x.permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
    return arr[..., :3]


def correct_mask(pred_xy: torch.Tensor | np.ndarray, gt_xy: torch.Tensor | np.ndarray, threshold: float,
                 inclusive: bool = True) -> np.ndarray:
    """PCK decision per point: ``distance <= threshold`` (DIFT) or ``<`` (TLFR, ``inclusive=False``)."""
    dist = np.linalg.norm(np.asarray(pred_xy, dtype=np.float64) - np.asarray(gt_xy, dtype=np.float64), axis=-1)
    return dist <= threshold if inclusive else dist < threshold


def similarity_map(src_desc: torch.Tensor, trg_desc: torch.Tensor, src_xy: Sequence[float] | torch.Tensor,
                   src_frame: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity ``(h', w')`` of the source descriptor at one point to every target cell.

    Args:
        src_desc, trg_desc: ``(C, h, w)`` and ``(C, h', w')`` descriptor maps.
        src_xy: the query ``(x, y)`` in the source *descriptor input frame* of ``src_frame = (H, W)``
            pixels; sampled bilinearly (:func:`cleandift.features.sample_points`).
    """
    xy = torch.as_tensor(src_xy, dtype=torch.float32).view(1, 2)
    query = sample_points(src_desc[None].float(), xy, src_frame)[0, 0]  # (C,)
    query = F.normalize(query, dim=0)
    target = F.normalize(trg_desc.float(), dim=0)
    return torch.einsum("c,chw->hw", query.to(target.device), target)


def _canvas(src: np.ndarray, trg: np.ndarray) -> tuple[np.ndarray, float]:
    """Both images side by side (top-aligned, white gap); returns the canvas and the target's x offset."""
    h = max(src.shape[0], trg.shape[0])
    offset = src.shape[1] + GAP
    canvas = np.full((h, offset + trg.shape[1], 3), 255, dtype=np.uint8)
    canvas[: src.shape[0], : src.shape[1]] = src
    canvas[: trg.shape[0], offset:] = trg
    return canvas, float(offset)


def _figure(figsize: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.94))
    ax.set_axis_off()
    return fig, ax


def _title_above(fig, ax, title: str | None, fontsize: float = 10.0, pad_px: float = 4.0) -> None:
    """Put ``title`` at the top, wrapped to the figure's width, and shrink the axes to the space below it,
    so a long title is never cut off and never covers the images (the PNG keeps its exact size)."""
    if not title:
        ax.set_position((0.0, 0.0, 1.0, 1.0))
        return
    from matplotlib.font_manager import FontProperties  # noqa: PLC0415

    renderer = fig.canvas.get_renderer()
    font = FontProperties(size=fontsize)
    max_width = fig.bbox.width - 2 * pad_px

    def width(text: str) -> float:
        return renderer.get_text_width_height_descent(text, font, ismath=False)[0]

    lines: list[str] = []
    for word in title.split():
        if lines and width(f"{lines[-1]} {word}") <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    text = fig.text(0.5, 1.0 - pad_px / fig.bbox.height, "\n".join(lines), ha="center", va="top",
                    fontproperties=font)
    bottom = text.get_window_extent(renderer).y0 - pad_px
    ax.set_position((0.0, 0.0, 1.0, max(0.05, bottom / fig.bbox.height)))


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", metadata={"Software": "cleandift"})
    return path


def _points(xy: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    arr = np.asarray(xy.detach().cpu() if isinstance(xy, torch.Tensor) else xy, dtype=np.float64)
    return arr.reshape(-1, 2)


def draw_matches(src_image: ImageLike, trg_image: ImageLike, src_xy, pred_xy, path: str | Path, *,
                 gt_xy=None, threshold: float | None = None, inclusive: bool = True, title: str | None = None,
                 figsize: tuple[float, float] = (12.0, 6.0), dpi: int = 100) -> Path:
    """Source points joined to their predicted target points; green if correct, red if not.

    Args:
        src_image, trg_image: the pair (any :data:`ImageLike`), drawn at their own sizes.
        src_xy: ``(N, 2)`` query points in the source image.
        pred_xy: ``(N, 2)`` predicted matches in the target image.
        gt_xy: ``(N, 2)`` true target points (drawn as crosses); with ``threshold`` (pixels, e.g.
            ``0.1 * max(bbox h, w)``) each line is coloured by the PCK decision. Without them lines
            are yellow.
        inclusive: ``<=`` (DIFT) or ``<`` (TLFR) at the threshold.
        figsize, dpi: the PNG is exactly ``figsize * dpi`` pixels.
    Returns:
        the written path.
    """
    src_pts, pred_pts = _points(src_xy), _points(pred_xy)
    if len(src_pts) != len(pred_pts):
        raise ValueError(f"got {len(src_pts)} source points and {len(pred_pts)} predictions")
    canvas, offset = _canvas(to_rgb_array(src_image), to_rgb_array(trg_image))
    colours = [NEUTRAL] * len(src_pts)
    gt_pts = _points(gt_xy) if gt_xy is not None else None
    if gt_pts is not None and threshold is not None:
        ok = correct_mask(pred_pts, gt_pts, threshold, inclusive)
        colours = [CORRECT if c else WRONG for c in ok]
        title = (title + "  " if title else "") + f"{int(ok.sum())}/{len(ok)} correct (threshold {threshold:.1f} px)"
    fig, ax = _figure(figsize, dpi)
    ax.imshow(canvas, interpolation="bilinear")
    for i, ((sx, sy), (px, py), colour) in enumerate(zip(src_pts, pred_pts, colours)):
        ax.plot([sx, px + offset], [sy, py], color=colour, linewidth=1.2, alpha=0.9)
        ax.scatter([sx, px + offset], [sy, py], s=22, c=colour, edgecolors="black", linewidths=0.5, zorder=3)
        if gt_pts is not None:
            gx, gy = gt_pts[i]
            ax.scatter([gx + offset], [gy], s=30, c=colour, marker="x", linewidths=1.5, zorder=4)
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    _title_above(fig, ax, title)
    return _save(fig, path, dpi)


def draw_heatmap(src_image: ImageLike, trg_image: ImageLike, src_point, similarity: torch.Tensor,
                 path: str | Path, *, pred_xy=None, gt_xy=None, alpha: float = 0.55, cmap: str = "jet",
                 title: str | None = None, figsize: tuple[float, float] = (12.0, 6.0), dpi: int = 100) -> Path:
    """Query point on the source; its similarity map over the target, overlaid on the target image.

    Args:
        src_point: ``(x, y)`` of the query in the source image.
        similarity: ``(h, w)`` scores on the target's feature grid (e.g. :func:`similarity_map`); it
            is bilinearly resized (``align_corners=False``) to the target image and min-max scaled.
        pred_xy, gt_xy: optional ``(x, y)`` in the target image, marked with a star / a cross.
    Returns:
        the written path.
    """
    src, trg = to_rgb_array(src_image), to_rgb_array(trg_image)
    canvas, offset = _canvas(src, trg)
    sim = similarity.detach().float().cpu()
    if sim.ndim != 2:
        raise ValueError(f"similarity must be (h, w), got {tuple(sim.shape)}")
    heat = F.interpolate(sim[None, None], size=trg.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)
    fig, ax = _figure(figsize, dpi)
    ax.imshow(canvas, interpolation="bilinear")
    extent = (offset - 0.5, offset + trg.shape[1] - 0.5, trg.shape[0] - 0.5, -0.5)
    ax.imshow(heat.numpy(), cmap=cmap, alpha=alpha, extent=extent, interpolation="bilinear", vmin=0.0, vmax=1.0)
    (qx, qy), = _points(src_point)
    ax.scatter([qx], [qy], s=90, c="white", marker="*", edgecolors="black", linewidths=0.8, zorder=3)
    if pred_xy is not None:
        (px, py), = _points(pred_xy)
        ax.scatter([px + offset], [py], s=90, c="white", marker="*", edgecolors="black", linewidths=0.8, zorder=3)
    if gt_xy is not None:
        (gx, gy), = _points(gt_xy)
        ax.scatter([gx + offset], [gy], s=60, c="white", marker="x", linewidths=1.8, zorder=4)
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    _title_above(fig, ax, title)
    return _save(fig, path, dpi)
