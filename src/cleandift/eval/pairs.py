"""The dataset-independent record of one annotated image pair, and checks shared by the readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DatasetError

#: Keypoints may sit up to this many pixels outside the pixel grid ``[-0.5, W - 0.5]`` (annotations
#: made in 1-based or edge coordinates put points at ``x = W``); anything further out is an error.
KEYPOINT_TOLERANCE = 1.0


@dataclass(frozen=True)
class CorrespondencePair:
    """One source/target pair with corresponding keypoints, in original-image pixel coordinates.

    Attributes:
        pair_id: dataset pair name (SPair: the annotation file stem; PF-Pascal: ``row<k>``).
        category: category name.
        src_id, trg_id: image ids, unique within the dataset (feature-cache keys), e.g. ``"cat/2009_001"``.
        src_image, trg_image: image files.
        src_size, trg_size: ``(H, W)`` of the original images.
        src_kps, trg_kps: ``(N, 2)`` float32 ``(x, y)`` corresponding keypoints (pixel-index).
        src_bbox, trg_bbox: ``(x1, y1, x2, y2)`` object boxes, or ``None`` (PF-Pascal).
        kps_ids: dataset keypoint ids of the ``N`` points, or ``None``.
        annotation: file the pair was read from (for error messages).
        extra: dataset-specific fields kept verbatim (SPair: ``src_annotation`` path, ``mirror``, ...).
    """

    pair_id: str
    category: str
    src_id: str
    trg_id: str
    src_image: Path
    trg_image: Path
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    src_bbox: tuple[float, float, float, float] | None
    trg_bbox: tuple[float, float, float, float] | None
    kps_ids: tuple[int, ...] | None
    annotation: Path
    extra: dict = field(default_factory=dict, compare=False)


def as_keypoints(values, source: Path, what: str) -> torch.Tensor:
    """``[[x, y], ...]`` -> ``(N, 2)`` float32, or :class:`DatasetError` naming ``source``."""
    try:
        kps = torch.tensor([[float(v) for v in p] for p in values], dtype=torch.float32).reshape(-1, 2)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DatasetError(f"{source}: {what} must be a list of [x, y] pairs ({exc})") from exc
    if not torch.isfinite(kps).all():
        raise DatasetError(f"{source}: {what} contains non-finite coordinates")
    return kps


def check_inside(kps: torch.Tensor, size: tuple[int, int], source: Path, what: str) -> None:
    """Raise :class:`DatasetError` if a keypoint lies outside the image (beyond the tolerance)."""
    h, w = size
    lo = -0.5 - KEYPOINT_TOLERANCE
    outside = (kps[:, 0] < lo) | (kps[:, 1] < lo) | (kps[:, 0] > w - 0.5 + KEYPOINT_TOLERANCE) | \
              (kps[:, 1] > h - 0.5 + KEYPOINT_TOLERANCE)
    if outside.any():
        i = int(outside.nonzero()[0, 0])
        x, y = kps[i].tolist()
        raise DatasetError(f"{source}: {what} #{i} at ({x:g}, {y:g}) is outside the {w}x{h} image "
                           f"({int(outside.sum())} such keypoint(s)); fix or remove the annotation")


def check_bbox(bbox, source: Path, what: str) -> tuple[float, float, float, float]:
    """Validate ``[x1, y1, x2, y2]``: four numbers with ``x2 > x1`` and ``y2 > y1``."""
    try:
        box = tuple(float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{source}: {what} must be [x1, y1, x2, y2] ({exc})") from exc
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        raise DatasetError(f"{source}: {what} must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, "
                           f"got {list(bbox)}")
    return box  # type: ignore[return-value]


def image_size_of(path: Path, annotation: Path) -> tuple[int, int]:
    """``(H, W)`` from the image header (no decoding), or :class:`DatasetError` naming both files."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not path.is_file():
        raise DatasetError(f"{path}: image file not found (referenced by {annotation})")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc}) (referenced by {annotation})") from exc
    return h, w
