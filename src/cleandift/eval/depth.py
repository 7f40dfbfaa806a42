"""NYUv2 monocular depth with a linear probe on diffusion features (paper §4.3, reference ``src/depth.py``).

Probe (as in the reference code): a 1x1 convolution ``C -> 256`` bins; the logits go through
``relu(x) + 0.1`` and are normalised to sum to one over the bins ("linear normalisation", AdaBins);
the depth is ``sum_k p_k * bin_k`` with 256 *uniform* bin centres over ``[0.1, 10]`` m. Training
loss: the scale-invariant log loss ``SigLoss`` on pixels with ``gt > 0``, targets sampled at the
feature cells (the reference bilinearly downsamples the GT to the 48x48 prediction; no feature
upsampling). Evaluation: the prediction is bilinearly upsampled to the original GT and scored with
RMSE / AbsRel / delta1 on ``1e-3 < gt <= 10`` m (optionally the Eigen crop), averaged per image.

Data layouts understood (:func:`open_depth_dataset`):

* **NYUv2 labelled set** ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5; read with ``h5py``).
  MATLAB stores column-major, so h5py sees every array *transposed*: ``images`` is
  ``(N, 3, W, H)`` uint8 and ``depths`` is ``(N, W, H)`` float metres (``W=640, H=480``); image
  ``i`` is ``images[i].transpose(2, 1, 0)`` -> ``(H, W, 3)`` and its depth ``depths[i].T``.
  The official 795 / 654 train / test split is ``splits.mat`` (``trainNdxs`` / ``testNdxs``,
  1-based) next to the .mat file (or passed explicitly); split ``all`` uses every image.
* **Folder**: ``root[/<split>]/rgb/<name>.{png,jpg,...}`` with ``root[/<split>]/depth/<name>.png``,
  16-bit PNGs in millimetres (0 = no measurement).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import DatasetError
from ..images import IMAGE_SUFFIXES, load_image
from .probe_common import (
    Extractor, FeatureNorm, FeatureSpec, ProbeResult, ProbeTrainConfig, collect_features, dataset_id, feature_settings,
    iter_features, open_cache, read_probe, require_nonempty, sample_frame_grid, sample_original, save_probe,
    seeded_module, train_probe,
)

logger = logging.getLogger(__name__)

NYU_MAT_NAME = "nyu_depth_v2_labeled.mat"
NYU_SPLITS_NAME = "splits.mat"
#: Eigen et al.'s evaluation crop of 480x640 NYUv2 frames: rows 45:471, columns 41:601.
EIGEN_CROP = (45, 471, 41, 601)


@dataclass
class DepthSample:
    name: str
    image: Image.Image
    depth: np.ndarray  # (H, W) float32 metres, 0 = invalid


# ---------------------------------------------------------------------------------------------- datasets
class NYUv2Labeled:
    """The labelled NYUv2 set from ``nyu_depth_v2_labeled.mat`` (see module docstring for the layout).

    Args:
        path: the ``.mat`` file.
        split: ``train`` / ``test`` (``val`` is an alias of ``test``) -- needs ``splits.mat`` -- or ``all``.
        splits_file: the split file; default ``splits.mat`` next to ``path``.
    """

    def __init__(self, path: str | Path, split: str = "test", splits_file: str | Path | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DatasetError(f"{self.path}: NYUv2 file not found")
        self._file = None
        n = self._check_layout()
        split = "test" if split == "val" else split
        if split == "all":
            self.indices = list(range(n))
        elif split in ("train", "test"):
            splits = Path(splits_file) if splits_file else self.path.with_name(NYU_SPLITS_NAME)
            self.indices = [i - 1 for i in _read_nyu_split(splits, split)]
            bad = [i + 1 for i in self.indices if not 0 <= i < n]
            if bad:
                raise DatasetError(f"{splits}: split indices {bad[:5]} are outside 1..{n} of {self.path}")
        else:
            raise DatasetError(f"{self.path}: unknown NYUv2 split {split!r}; use train, test or all")
        self.split = split
        require_nonempty(self.indices, f"NYUv2 split {split!r}", splits_file or self.path)

    def _h5(self):
        if self._file is None:
            import h5py  # noqa: PLC0415

            self._file = h5py.File(self.path, "r")
        return self._file

    def _check_layout(self) -> int:
        try:
            import h5py  # noqa: PLC0415
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise DatasetError(f"{self.path}: reading the NYUv2 .mat needs h5py (pip install h5py)") from exc
        try:
            f = self._h5()
        except OSError as exc:
            raise DatasetError(f"{self.path}: not an HDF5 (MATLAB v7.3) file ({exc}); expected the official "
                               f"{NYU_MAT_NAME}") from exc
        missing = [k for k in ("images", "depths") if k not in f]
        if missing:
            raise DatasetError(f"{self.path}: missing dataset(s) {missing}; expected 'images' (N,3,W,H) and "
                               "'depths' (N,W,H)")
        images, depths = f["images"], f["depths"]
        if images.ndim != 4 or images.shape[1] != 3 or depths.ndim != 3 or images.shape[0] != depths.shape[0] \
                or tuple(images.shape[2:]) != tuple(depths.shape[1:]):
            raise DatasetError(f"{self.path}: unexpected shapes images {images.shape}, depths {depths.shape}; "
                               "expected (N,3,W,H) and (N,W,H) (MATLAB order as read by h5py)")
        return int(images.shape[0])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> DepthSample:
        i = self.indices[k]
        f = self._h5()
        rgb = np.ascontiguousarray(np.asarray(f["images"][i]).transpose(2, 1, 0))  # (3,W,H) -> (H,W,3)
        depth = np.ascontiguousarray(np.asarray(f["depths"][i], dtype=np.float32).T)  # (W,H) -> (H,W)
        return DepthSample(f"nyu_{i + 1:04d}", Image.fromarray(rgb.astype(np.uint8), mode="RGB"), depth)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def describe(self) -> str:
        return f"nyuv2-mat:{self.path}:{self.split}"


def _read_nyu_split(path: Path, split: str) -> list[int]:
    """1-based image indices of ``split`` from ``splits.mat`` (MATLAB v5 via scipy, or v7.3 via h5py)."""
    if not path.is_file():
        raise DatasetError(f"{path}: NYUv2 split file not found (the official splits.mat with trainNdxs/testNdxs); "
                           "place it next to the .mat or use split 'all'")
    key = "trainNdxs" if split == "train" else "testNdxs"
    try:
        from scipy.io import loadmat  # noqa: PLC0415

        data = loadmat(str(path))
        values = data[key]
    except NotImplementedError:  # v7.3 file: HDF5
        import h5py  # noqa: PLC0415

        with h5py.File(path, "r") as f:
            values = np.asarray(f[key])
    except KeyError as exc:
        raise DatasetError(f"{path}: no {key!r} in the split file") from exc
    except ImportError as exc:  # pragma: no cover
        raise DatasetError(f"{path}: reading splits.mat needs scipy (pip install scipy)") from exc
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path}: unreadable split file ({exc})") from exc
    return [int(v) for v in np.asarray(values).reshape(-1)]


class DepthFolder:
    """``<root>[/<split>]/rgb/<name>.<ext>`` images, ``.../depth/<name>.png`` 16-bit depth in ``1/depth_scale`` m."""

    def __init__(self, root: str | Path, split: str | None = None, depth_scale: float = 1000.0) -> None:
        root = Path(root).expanduser()
        base = root / split if split else root
        if split and not base.is_dir():
            raise DatasetError(f"{base}: split folder not found (expected {root}/<split>/rgb and .../depth)")
        self.rgb_dir, self.depth_dir = base / "rgb", base / "depth"
        for folder in (self.rgb_dir, self.depth_dir):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: folder not found (layout: rgb/<name>.png + depth/<name>.png)")
        self.images = sorted(p for p in self.rgb_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        require_nonempty(self.images, "rgb folder", self.rgb_dir)
        for img in self.images:
            if not self.depth_path(img).is_file():
                raise DatasetError(f"{self.depth_path(img)}: depth map missing for image {img.name}")
        self.depth_scale = float(depth_scale)
        self.base = base

    def depth_path(self, image: Path) -> Path:
        return self.depth_dir / f"{image.stem}.png"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> DepthSample:
        path = self.images[k]
        return DepthSample(path.stem, load_image(path), read_depth_png(self.depth_path(path), self.depth_scale))

    def describe(self) -> str:
        return f"depth-folder:{self.base}"


def read_depth_png(path: str | Path, scale: float = 1000.0) -> np.ndarray:
    """A 16-bit depth PNG as float32 metres (``value / scale``); 8-bit files are refused (lossy depth)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable depth PNG ({exc})") from exc
    if mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DatasetError(f"{path}: depth PNG has mode {mode}; expected a 16-bit single-channel PNG in millimetres")
    return arr.astype(np.float32) / scale


def open_depth_dataset(root: str | Path, split: str | None = "test", splits_file: str | Path | None = None):
    """NYUv2 ``.mat`` (a file, or a folder containing ``nyu_depth_v2_labeled.mat``) or a depth folder."""
    root = Path(root).expanduser()
    if root.suffix == ".mat":
        return NYUv2Labeled(root, split or "all", splits_file)
    if (root / NYU_MAT_NAME).is_file():
        return NYUv2Labeled(root / NYU_MAT_NAME, split or "all", splits_file)
    if not root.exists():
        raise DatasetError(f"{root}: depth dataset not found")
    return DepthFolder(root, split)


# ---------------------------------------------------------------------------------------------- probe + loss
class DepthProbe(nn.Module):
    """Linear depth head: (standardise) -> 1x1 conv to ``n_bins`` -> ``relu + 0.1`` -> normalise -> ``sum p * bin``."""

    def __init__(self, channels: int, n_bins: int = 256, min_depth: float = 0.1, max_depth: float = 10.0) -> None:
        super().__init__()
        self.config = {"channels": channels, "n_bins": n_bins, "min_depth": min_depth, "max_depth": max_depth}
        self.norm = FeatureNorm(channels)
        self.conv = nn.Conv2d(channels, n_bins, kernel_size=1)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins))

    def bin_probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        logits = self.conv(self.norm(feats))
        weights = torch.relu(logits) + 0.1
        return weights / weights.sum(dim=1, keepdim=True)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` features -> ``(B, 1, h, w)`` depth in metres."""
        probs = self.bin_probabilities(feats)
        return (probs * self.bins.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "DepthProbe":
        state, config = read_probe(path)
        probe = cls(**config["probe"])
        probe.load_state_dict(state)
        return probe.eval()


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None, lam: float = 0.15,
             eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss ``sqrt(var(g) + lam * mean(g)^2)`` with ``g = log(pred+eps) - log(gt+eps)``.

    ``valid`` defaults to ``gt > 0``. ``var`` is the unbiased variance (``torch.var``), as in the
    reference. With fewer than two valid pixels the loss is 0 (keeps the graph, no NaN).
    """
    pred, gt = pred.reshape(-1), gt.reshape(-1)
    mask = gt > 0 if valid is None else valid.reshape(-1) & (gt > 0)
    if int(mask.sum()) < 2:
        return pred.sum() * 0.0
    g = torch.log(pred[mask] + eps) - torch.log(gt[mask] + eps)
    return torch.sqrt(torch.var(g) + lam * g.mean().pow(2))


# ---------------------------------------------------------------------------------------------- metrics
def depth_errors(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """RMSE, AbsRel and delta1 of one depth map over ``mask`` (default ``gt > 0``); pooled over pixels."""
    m = gt > 0 if mask is None else mask & (gt > 0)
    p, g = pred[m].double(), gt[m].double()
    if p.numel() == 0:
        raise ValueError("no valid pixels")
    ratio = torch.maximum(p / g, g / p)
    return {"rmse": float(((p - g) ** 2).mean().sqrt()), "abs_rel": float(((p - g).abs() / g).mean()),
            "delta1": float((ratio < 1.25).double().mean())}


class DepthMetrics:
    """RMSE / AbsRel / delta1 accumulated over images (update / compute / reset, torchmetrics-style).

    Args:
        min_depth, max_depth: evaluated pixels have ``min_depth < gt <= max_depth`` (NYUv2: 1e-3, 10 m).
        reduction: ``image`` -- metrics per image, then the mean over images (the depth-toolbox /
            BinsFormer convention); ``pixel`` -- pooled over all valid pixels.
        min_pred: predictions are clamped to at least this (ratios and logs stay finite).
    """

    higher_is_better = {"rmse": False, "abs_rel": False, "delta1": True}

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0,
                 reduction: Literal["image", "pixel"] = "image", min_pred: float = 1e-3) -> None:
        if reduction not in ("image", "pixel"):
            raise ValueError(f"reduction must be 'image' or 'pixel', got {reduction!r}")
        self.min_depth, self.max_depth, self.reduction, self.min_pred = min_depth, max_depth, reduction, min_pred
        self.reset()

    def reset(self) -> None:
        self.sum_sq = self.sum_absrel = self.sum_d1 = 0.0  # pixel reduction: sums over pixels
        self.sum_rmse = self.sum_img_absrel = self.sum_img_d1 = 0.0  # image reduction: sums over images
        self.num_pixels = 0
        self.num_images = 0

    def update(self, pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one ``(H, W)`` map or a ``(B, H, W)`` batch (``mask`` further restricts valid pixels)."""
        if pred.shape != gt.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
        if pred.ndim == 2:
            pred, gt = pred[None], gt[None]
            mask = None if mask is None else mask[None]
        for b in range(pred.shape[0]):
            valid = (gt[b] > self.min_depth) & (gt[b] <= self.max_depth)
            if mask is not None:
                valid &= mask[b].bool()
            n = int(valid.sum())
            if n == 0:
                continue
            p = pred[b][valid].double().clamp_min(self.min_pred)
            g = gt[b][valid].double()
            sq = ((p - g) ** 2).sum().item()
            absrel = ((p - g).abs() / g).sum().item()
            d1 = (torch.maximum(p / g, g / p) < 1.25).sum().item()
            self.sum_sq += sq
            self.sum_absrel += absrel
            self.sum_d1 += d1
            self.num_pixels += n
            self.sum_rmse += (sq / n) ** 0.5
            self.sum_img_absrel += absrel / n
            self.sum_img_d1 += d1 / n
            self.num_images += 1

    def compute(self) -> dict[str, float]:
        if self.num_images == 0:
            raise ValueError("DepthMetrics: no valid pixels were seen")
        if self.reduction == "pixel":
            n = self.num_pixels
            values = {"rmse": (self.sum_sq / n) ** 0.5, "abs_rel": self.sum_absrel / n, "delta1": self.sum_d1 / n}
        else:
            n = self.num_images
            values = {"rmse": self.sum_rmse / n, "abs_rel": self.sum_img_absrel / n, "delta1": self.sum_img_d1 / n}
        return {**values, "num_images": self.num_images, "num_pixels": self.num_pixels}


# ---------------------------------------------------------------------------------------------- protocol
@dataclass
class DepthProbeConfig:
    """Depth-specific protocol options.

    Args:
        n_bins, min_depth, max_depth: the classification head (reference: 256 uniform bins, 0.1-10 m).
        eval_min_depth, eval_max_depth: evaluated GT range (NYUv2 convention: 1e-3 < gt <= 10).
        eval_crop: ``none`` or ``eigen`` (rows 45:471, cols 41:601 of 480x640 GT; other sizes are
            evaluated uncropped with a warning).
        reduction: metric averaging, ``image`` (per image then mean) or ``pixel``.
        sig_lambda: the ``lambda`` of SigLoss (0.15 in the reference).
    """

    n_bins: int = 256
    min_depth: float = 0.1
    max_depth: float = 10.0
    eval_min_depth: float = 1e-3
    eval_max_depth: float = 10.0
    eval_crop: Literal["none", "eigen"] = "none"
    reduction: Literal["image", "pixel"] = "image"
    sig_lambda: float = 0.15


def depth_target(sample: DepthSample, tf, grid_hw: tuple[int, int]) -> torch.Tensor:
    """GT sampled bilinearly at the feature cells; 0 (= ignored) where any contributing pixel is invalid."""
    gt = torch.from_numpy(np.asarray(sample.depth, dtype=np.float32))[None]
    depth, inside = sample_frame_grid(gt, tf, grid_hw, "bilinear")
    valid_frac, _ = sample_frame_grid((gt > 0).float(), tf, grid_hw, "bilinear")
    ok = inside & (valid_frac[0] > 1 - 1e-6)
    return torch.where(ok, depth[0], torch.zeros_like(depth[0]))


def _eval_mask(gt: torch.Tensor, crop: str) -> torch.Tensor | None:
    if crop == "none":
        return None
    if crop != "eigen":
        raise ValueError(f"eval_crop must be 'none' or 'eigen', got {crop!r}")
    if tuple(gt.shape) != (480, 640):
        logger.warning("eigen crop needs 480x640 ground truth, got %s; evaluating uncropped", tuple(gt.shape))
        return None
    mask = torch.zeros_like(gt, dtype=torch.bool)
    top, bottom, left, right = EIGEN_CROP
    mask[top:bottom, left:right] = True
    return mask


def train_depth_probe(extractor: Extractor, dataset: Sequence, spec: FeatureSpec, train: ProbeTrainConfig,
                      config: DepthProbeConfig | None = None, cache=None, device=None,
                      progress: bool = True) -> tuple[DepthProbe, list[float]]:
    """Extract (or read cached) features of ``dataset``, then fit a :class:`DepthProbe` with SigLoss."""
    config = config or DepthProbeConfig()
    feats, targets = collect_features(extractor, dataset, spec,
                                      lambda sample, tf, f: depth_target(sample, tf, tuple(f.shape[-2:])),
                                      cache, desc="depth features (train)", progress=progress)
    probe = seeded_module(lambda: DepthProbe(feats[0].shape[0], config.n_bins, config.min_depth, config.max_depth),
                          train.seed)
    if train.standardize:
        probe.norm.fit(feats)

    def loss_fn(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return sig_loss(pred[:, 0], gt, lam=config.sig_lambda)

    history = train_probe(probe, feats, torch.stack(targets), loss_fn, train, device, "depth probe", progress)
    return probe, history


@torch.no_grad()
def evaluate_depth_probe(extractor: Extractor, probe: DepthProbe, dataset: Sequence, spec: FeatureSpec,
                         config: DepthProbeConfig | None = None, cache=None, device=None,
                         progress: bool = True) -> dict[str, float]:
    """Predict every image, upsample bilinearly to its original GT, and score (see :class:`DepthMetrics`)."""
    config = config or DepthProbeConfig()
    device = torch.device(device) if device is not None else torch.device("cpu")
    probe = probe.to(device).eval()
    metrics = DepthMetrics(config.eval_min_depth, config.eval_max_depth, config.reduction)
    for _, samples, tfs, batch in iter_features(extractor, dataset, spec, cache, desc="depth features (eval)",
                                                progress=progress):
        pred = probe(batch.to(device)).cpu()
        for sample, tf, p in zip(samples, tfs, pred):
            full, inside = sample_original(p, tf, "bilinear")
            gt = torch.from_numpy(np.asarray(sample.depth, dtype=np.float32))
            mask = inside
            crop = _eval_mask(gt, config.eval_crop)
            if crop is not None:
                mask = mask & crop
            metrics.update(full[0], gt, mask)
    return metrics.compute()


def run_depth_probe(extractor: Extractor, train_set: Sequence, eval_set: Sequence, spec: FeatureSpec | None = None,
                    train: ProbeTrainConfig | None = None, config: DepthProbeConfig | None = None,
                    cache_dir: str | Path | None = None, device=None, progress: bool = True,
                    save_path: str | Path | None = None) -> ProbeResult:
    """Train on ``train_set``, evaluate on ``eval_set``; optionally save the probe (safetensors).

    ``cache_dir`` stores per-image features on disk (keyed by extractor, weights and ``spec``), so a
    second run -- another probe setting, or an interrupted run -- skips the diffusion model.
    """
    spec, train, config = spec or FeatureSpec(), train or ProbeTrainConfig(), config or DepthProbeConfig()
    train_cache = open_cache(cache_dir, lambda: feature_settings(extractor, spec, dataset_id(train_set)))
    eval_cache = open_cache(cache_dir, lambda: feature_settings(extractor, spec, dataset_id(eval_set)))
    probe, history = train_depth_probe(extractor, train_set, spec, train, config, train_cache, device, progress)
    metrics = evaluate_depth_probe(extractor, probe, eval_set, spec, config, eval_cache, device, progress)
    run_config = {"probe": probe.config, "features": asdict(spec), "train": asdict(train), "depth": asdict(config),
                  "train_set": dataset_id(train_set), "eval_set": dataset_id(eval_set)}
    weights = str(save_probe(probe, save_path, run_config)) if save_path else None
    return ProbeResult("depth", metrics, run_config, history, probe, weights)

