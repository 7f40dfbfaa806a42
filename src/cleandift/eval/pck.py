"""PCK (percentage of correct keypoints) -- a pure functional core and an update/compute metric.

The three baselines CleanDIFT compares against use three different PCK conventions, and numbers
move by several points between them (GeoAware-SC #14, dhpf #3). Every choice is therefore explicit:

* **Frame.** Predictions and ground truth are ``(x, y)`` pixel-index coordinates of the *original*
  target image (pixel centres at integers, :mod:`cleandift.images`).
* **Threshold** (``kind``): ``bbox`` -- ``max(x2 - x1, y2 - y1)`` of the *target* bounding box
  ``[x1, y1, x2, y2]`` (SPair-71k, DIFT / SD-DINO / TLFR); ``img`` -- ``max(H, W)`` of the target
  image (``PCK_img``; PF-Pascal).
* **Comparison** (``comparison``): a keypoint is correct iff ``dist / threshold <= alpha`` (``"<="``,
  DIFT's ``eval_spair.py``) or ``< alpha`` (``"<"``, SD-DINO / TLFR). ``dist`` is the Euclidean
  distance in original pixels; the ratio is computed in float64, so a point exactly on the circle
  is decided by the comparison, not by rounding.
* **Aggregation**: ``per-point`` -- correct keypoints / all keypoints, pooled over pairs (what the
  CleanDIFT paper reports); ``per-image`` -- the mean over pairs of each pair's accuracy (TLFR's
  default; pairs are weighted equally, so the overall value is the pair-weighted mean of the
  categories). Both are always reported.
* **Masking**: keypoints that are padding or invisible never count -- neither as correct nor in the
  denominator. A keypoint is ignored if the ``valid`` mask says so, if its ground truth is not finite
  (NaN padding), or if any ground-truth coordinate is below ``-0.5`` (left of / above the image in
  the pixel convention -- this catches the ``-1`` padding of PF-Willow-style tensors, dhpf #3). A
  pair without valid keypoints adds nothing to either average.

Values are fractions in [0, 1], like every rate in cleandift's result files (tables print them as
percent). Result keys are unambiguous: ``pck@0.10/bbox/per-point``.

>>> import torch
>>> gt = torch.tensor([[10.0, 10.0], [50.0, 50.0], [-1.0, -1.0]])     # third point is padding
>>> pred = torch.tensor([[10.0, 15.0], [50.0, 70.0], [0.0, 0.0]])
>>> pck_correct(pred, gt, threshold=50.0, alpha=0.1).tolist()        # 5/50 <= 0.1, 20/50 > 0.1
[True, False, False]
>>> pck_correct(pred, gt, threshold=50.0, alpha=0.1, comparison="<").tolist()
[False, False, False]
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

Comparison = Literal["<=", "<"]
ThresholdKind = Literal["bbox", "img"]
COMPARISONS: tuple[str, ...] = ("<=", "<")
THRESHOLD_KINDS: tuple[str, ...] = ("bbox", "img")
AVERAGES: tuple[str, ...] = ("per-point", "per-image")
DEFAULT_ALPHAS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.15)


# ---------------------------------------------------------------------------------------------- functional
def keypoint_mask(gt_xy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Which ground-truth keypoints count: ``(..., N, 2) -> (..., N)`` bool (see module docstring)."""
    gt = gt_xy.to(torch.float64)
    mask = torch.isfinite(gt).all(-1) & (gt >= -0.5).all(-1)
    if valid is not None:
        mask = mask & valid.to(device=mask.device, dtype=torch.bool)
    return mask


def pck_threshold(kind: ThresholdKind, bbox: torch.Tensor | Sequence[float] | None = None,
                  image_size: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Per-pair PCK normaliser in pixels, float64 of shape ``(...)``.

    Args:
        kind: ``bbox`` -> ``max(x2 - x1, y2 - y1)`` of ``bbox`` ``(..., 4)`` (target box,
            ``[x1, y1, x2, y2]``); ``img`` -> ``max(H, W)`` of ``image_size`` ``(..., 2)``, given as
            ``(H, W)``.
    """
    if kind == "bbox":
        if bbox is None:
            raise ValueError("threshold 'bbox' needs the target bounding box [x1, y1, x2, y2]")
        box = torch.as_tensor(bbox, dtype=torch.float64)
        if box.shape[-1] != 4:
            raise ValueError(f"bbox must have 4 values [x1, y1, x2, y2] in its last dimension, "
                             f"got {tuple(box.shape)}")
        thr = torch.maximum(box[..., 2] - box[..., 0], box[..., 3] - box[..., 1])
    elif kind == "img":
        if image_size is None:
            raise ValueError("threshold 'img' needs the target image size (H, W)")
        size = torch.as_tensor(image_size, dtype=torch.float64)
        if size.shape[-1] != 2:
            raise ValueError(f"image_size must be (H, W) in its last dimension, got {tuple(size.shape)}")
        thr = size.max(-1).values
    else:
        raise ValueError(f"unknown threshold kind {kind!r}; choose from {', '.join(THRESHOLD_KINDS)}")
    if (thr <= 0).any():
        raise ValueError(f"PCK threshold must be positive, got {thr.tolist()} ({kind})")
    return thr


def pck_correct(pred_xy: torch.Tensor, gt_xy: torch.Tensor, threshold: float | torch.Tensor,
                alpha: float = 0.1, comparison: Comparison = "<=", valid: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per-keypoint correctness ``(..., N)``; masked keypoints are ``False`` (count: :func:`keypoint_mask`).

    Args:
        pred_xy, gt_xy: ``(..., N, 2)`` points in the same (original target) frame.
        threshold: normaliser in pixels, scalar or ``(...)`` per pair (:func:`pck_threshold`).
        alpha: fraction of the threshold.
        comparison: ``"<="`` (DIFT) or ``"<"`` (SD-DINO / TLFR) applied to ``dist / threshold`` vs ``alpha``.
        valid: optional ``(..., N)`` mask of keypoints that exist.
    """
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    if pred_xy.shape != gt_xy.shape or pred_xy.shape[-1] != 2:
        raise ValueError(f"pred_xy and gt_xy must both be (..., N, 2), got {tuple(pred_xy.shape)} "
                         f"and {tuple(gt_xy.shape)}")
    dist = torch.linalg.vector_norm(pred_xy.to(torch.float64) - gt_xy.to(torch.float64), dim=-1)
    thr = torch.as_tensor(threshold, dtype=torch.float64, device=dist.device)
    if (thr <= 0).any():
        raise ValueError(f"PCK threshold must be positive, got {thr.tolist()}")
    ratio = dist / thr.unsqueeze(-1) if thr.ndim else dist / thr
    ok = ratio <= alpha if comparison == "<=" else ratio < alpha
    return ok & keypoint_mask(gt_xy, valid).to(ok.device)


def pck(pred_xy: torch.Tensor, gt_xy: torch.Tensor, threshold: float | torch.Tensor, alpha: float = 0.1,
        comparison: Comparison = "<=", valid: torch.Tensor | None = None,
        average: str = "per-point") -> float:
    """PCK (a fraction in [0, 1]) of pairs ``(B, N, 2)`` (or one pair ``(N, 2)``); ``nan`` if nothing counts."""
    if pred_xy.ndim == 2:
        pred_xy, gt_xy = pred_xy[None], gt_xy[None]
        valid = None if valid is None else valid[None]
    correct = pck_correct(pred_xy, gt_xy, threshold, alpha, comparison, valid).sum(-1).double()
    counts = keypoint_mask(gt_xy, valid).sum(-1).double()
    return _aggregate(correct, counts, average)


def _aggregate(correct: torch.Tensor, counts: torch.Tensor, average: str) -> float:
    """``per-point``: sum(correct) / sum(counts); ``per-image``: mean of correct / counts over pairs."""
    if average == "per-point":
        total = counts.sum()
        return float(correct.sum() / total) if total > 0 else float("nan")
    if average == "per-image":
        keep = counts > 0
        return float((correct[keep] / counts[keep]).mean()) if keep.any() else float("nan")
    raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


def pck_key(alpha: float, kind: str, average: str) -> str:
    """Result label, e.g. ``pck@0.10/bbox/per-point`` (two decimals unless alpha needs more)."""
    text = f"{alpha:.2f}" if abs(round(alpha, 2) - alpha) < 1e-12 else f"{alpha:g}"
    return f"pck@{text}/{kind}/{average}"


# ---------------------------------------------------------------------------------------------- metric
class PCK:
    """Accumulating PCK over pairs, per keypoint and per image, overall and per category.

    Args:
        alphas: fractions of the threshold (default 0.01, 0.05, 0.10, 0.15).
        thresholds: which normalisers to report (``bbox`` needs ``bbox`` in :meth:`update`,
            ``img`` needs ``image_size``).
        comparison: ``"<="`` (DIFT) or ``"<"`` (SD-DINO / TLFR).

    >>> import torch
    >>> metric = PCK(alphas=(0.1,), thresholds=("bbox",))
    >>> metric.update(torch.tensor([[0., 0.], [9., 0.]]), torch.tensor([[0., 0.], [0., 0.]]),
    ...               bbox=[0, 0, 100, 50], category="cat")
    >>> metric.update(torch.tensor([[0., 0.]]), torch.tensor([[0., 0.]]), bbox=[0, 0, 100, 50],
    ...               category="dog")
    >>> r = metric.compute()
    >>> round(r["pck@0.10/bbox/per-point"], 2), round(r["pck@0.10/bbox/per-image"], 2)
    (1.0, 1.0)
    """

    higher_is_better = True

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, thresholds: Sequence[str] = THRESHOLD_KINDS,
                 comparison: Comparison = "<=") -> None:
        if comparison not in COMPARISONS:
            raise ValueError(f"Expected argument `comparison` to be one of {COMPARISONS} "
                             f"but got {comparison!r}")
        bad = [k for k in thresholds if k not in THRESHOLD_KINDS]
        if bad or not thresholds:
            raise ValueError(f"Expected argument `thresholds` to be a non-empty subset of {THRESHOLD_KINDS}, "
                             f"got {tuple(thresholds)}")
        if not alphas or any(not 0 < a for a in alphas):
            raise ValueError(f"Expected argument `alphas` to be positive numbers, got {tuple(alphas)}")
        self.alphas = tuple(float(a) for a in alphas)
        self.thresholds = tuple(thresholds)
        self.comparison = comparison
        self.reset()

    @property
    def columns(self) -> list[tuple[str, float]]:
        """``(kind, alpha)`` in the order of the per-pair correct counts."""
        return [(kind, alpha) for kind in self.thresholds for alpha in self.alphas]

    def reset(self) -> None:
        self._correct: list[torch.Tensor] = []  # per update: (B, len(columns)) correct counts
        self._counts: list[torch.Tensor] = []  # per update: (B,) valid keypoints
        self._categories: list[str] = []

    def update(self, pred_xy: torch.Tensor, gt_xy: torch.Tensor, *, bbox=None, image_size=None,
               valid: torch.Tensor | None = None, category: str | Sequence[str] | None = None) -> None:
        """Add pairs.

        Args:
            pred_xy, gt_xy: ``(N, 2)`` for one pair or ``(B, N, 2)``; original target frame.
            bbox: target box ``[x1, y1, x2, y2]``, ``(4,)`` or ``(B, 4)`` (needed for ``bbox``).
            image_size: target ``(H, W)``, ``(2,)`` or ``(B, 2)`` (needed for ``img``).
            valid: optional ``(N,)`` / ``(B, N)`` mask of keypoints that exist.
            category: one name for all pairs or one per pair (default ``"all"``).
        """
        if pred_xy.ndim == 2:
            pred_xy, gt_xy = pred_xy[None], gt_xy[None]
            valid = None if valid is None else valid[None]
        b = pred_xy.shape[0]
        columns = []
        for kind in self.thresholds:
            thr = pck_threshold(kind, bbox=bbox, image_size=image_size)
            thr = thr.expand(b) if thr.ndim == 0 else thr.reshape(-1)
            if thr.numel() != b:
                raise ValueError(f"got {thr.numel()} {kind} thresholds for {b} pairs")
            for alpha in self.alphas:
                ok = pck_correct(pred_xy.cpu(), gt_xy.cpu(), thr, alpha, self.comparison,
                                 None if valid is None else valid.cpu())
                columns.append(ok.sum(-1))
        self._correct.append(torch.stack(columns, dim=-1).long())
        self._counts.append(keypoint_mask(gt_xy.cpu(), None if valid is None else valid.cpu()).sum(-1).long())
        if category is None or isinstance(category, str):
            self._categories.extend([category or "all"] * b)
        else:
            category = list(category)
            if len(category) != b:
                raise ValueError(f"got {len(category)} categories for {b} pairs")
            self._categories.extend(str(c) for c in category)

    @property
    def num_pairs(self) -> int:
        return len(self._categories)

    def compute(self) -> dict[str, float | int]:
        """Overall results: ``{"pck@0.10/bbox/per-point": ..., ..., "n_pairs": ..., "n_keypoints": ...}``."""
        return self._summarise(None)

    def compute_per_category(self) -> dict[str, dict[str, float | int]]:
        """Same keys per category (sorted by name)."""
        return {cat: self._summarise(cat) for cat in sorted(set(self._categories))}

    def _summarise(self, category: str | None) -> dict[str, float | int]:
        if self._correct:
            correct = torch.cat(self._correct).double()
            counts = torch.cat(self._counts).double()
        else:
            correct = torch.zeros(0, len(self.columns), dtype=torch.float64)
            counts = torch.zeros(0, dtype=torch.float64)
        if category is not None:
            keep = torch.tensor([c == category for c in self._categories], dtype=torch.bool)
            correct, counts = correct[keep], counts[keep]
        out: dict[str, float | int] = {}
        for col, (kind, alpha) in enumerate(self.columns):
            for average in AVERAGES:
                out[pck_key(alpha, kind, average)] = _aggregate(correct[:, col], counts, average)
        out["n_pairs"] = int(correct.shape[0])
        out["n_keypoints"] = int(counts.sum().item())
        return out
