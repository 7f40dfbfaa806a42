"""PASCAL VOC 2012 semantic segmentation with a linear probe on diffusion features (paper §4.4).

Protocol (paper: linear probe on the 48x48 maps, masks upscaled with nearest neighbour, mIoU;
everything else is unpublished and a named option here): a 1x1 convolution ``C -> 21`` on the
(standardised) tap features, trained with cross-entropy against the label sampled (nearest) at the
feature cells, ignoring 255. At evaluation the per-cell argmax is upsampled **nearest-neighbour** to
the original label and scored with a confusion-matrix mIoU that ignores 255 (with ``--resize crop``,
label pixels outside the crop were never seen by the model and are ignored too).

Layout (the official ``VOCdevkit/VOC2012`` tree; ``root`` may be ``VOCdevkit/VOC2012``,
``VOCdevkit`` or the folder holding ``VOCdevkit``)::

    JPEGImages/<name>.jpg
    SegmentationClass/<name>.png      # palette PNG: pixel value = class index, 255 = ignore (borders)
    ImageSets/Segmentation/{train,val}.txt

RGB-coloured label PNGs (re-saved without the palette) are mapped back through the VOC colour map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import DatasetError
from ..images import load_image
from .probe_common import (
    Extractor, FeatureNorm, FeatureSpec, ProbeResult, ProbeTrainConfig, collect_features, dataset_id, feature_settings,
    iter_features, open_cache, read_probe, require_nonempty, sample_frame_grid, sample_original, save_probe,
    seeded_module, train_probe,
)

IGNORE_INDEX = 255
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC colour map ``(n, 3)`` uint8: the bits of the class index spread over R, G, B from the top bit down."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


@dataclass
class SegSample:
    name: str
    image: Image.Image
    label: np.ndarray  # (H, W) class indices, 255 = ignore


# ---------------------------------------------------------------------------------------------- dataset
def find_voc_root(root: str | Path) -> Path:
    """The folder holding ``ImageSets/Segmentation`` among ``root``, ``root/VOC2012``, ``root/VOCdevkit/VOC2012``."""
    root = Path(root).expanduser()
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise DatasetError(f"{root}: no VOC layout found (expected ImageSets/Segmentation/, JPEGImages/, "
                       "SegmentationClass/ under it, under VOC2012/ or under VOCdevkit/VOC2012/)")


def read_voc_label(path: str | Path) -> np.ndarray:
    """A VOC label PNG as ``(H, W)`` uint8 class indices (palette or grey values; RGB via the colour map)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img.convert("RGB") if mode not in ("P", "L", "RGB") else img)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable label PNG ({exc})") from exc
    if mode in ("P", "L"):
        return arr.astype(np.uint8)
    pal = voc_palette().astype(np.int64)
    codes = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
    lut = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(pal) if i < 21 or i == IGNORE_INDEX}
    out = np.full(codes.shape, IGNORE_INDEX, dtype=np.uint8)
    unknown = set(np.unique(codes).tolist()) - set(lut)
    if unknown:
        raise DatasetError(f"{path}: {len(unknown)} colour(s) that are not VOC classes; expected a palette PNG")
    for code, idx in lut.items():
        out[codes == code] = idx
    return out


class VOCSegmentation:
    """One split of VOC2012 segmentation. Every listed image and label is checked to exist up front."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        self.root = find_voc_root(root)
        self.split = split
        self.split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not self.split_file.is_file():
            raise DatasetError(f"{self.split_file}: split file not found")
        self.names = [ln.strip().split()[0] for ln in self.split_file.read_text().splitlines() if ln.strip()]
        require_nonempty(self.names, f"split {split!r}", self.split_file)
        for name in self.names:
            for path in (self.image_path(name), self.label_path(name)):
                if not path.is_file():
                    raise DatasetError(f"{path}: file not found (listed in {self.split_file})")

    def image_path(self, name: str) -> Path:
        return self.root / "JPEGImages" / f"{name}.jpg"

    def label_path(self, name: str) -> Path:
        return self.root / "SegmentationClass" / f"{name}.png"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, k: int) -> SegSample:
        name = self.names[k]
        image = load_image(self.image_path(name))
        label = read_voc_label(self.label_path(name))
        if label.shape != (image.height, image.width):
            raise DatasetError(f"{self.label_path(name)}: label is {label.shape[1]}x{label.shape[0]}, "
                               f"image is {image.width}x{image.height}")
        return SegSample(name, image, label)

    def describe(self) -> str:
        return f"voc:{self.root}:{self.split}"


# ---------------------------------------------------------------------------------------------- probe + metric
class SegmentationProbe(nn.Module):
    """Linear segmentation head: (standardise) -> 1x1 conv ``C -> num_classes`` logits."""

    def __init__(self, channels: int, num_classes: int = len(VOC_CLASSES)) -> None:
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes}
        self.norm = FeatureNorm(channels)
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(feats))

    @classmethod
    def from_file(cls, path: str | Path) -> "SegmentationProbe":
        state, config = read_probe(path)
        probe = cls(**config["probe"])
        probe.load_state_dict(state)
        return probe.eval()


class MeanIoU:
    """Confusion-matrix mIoU (update / compute / reset); pixels whose target is ``ignore_index`` are skipped.

    IoU_c = TP / (TP + FP + FN); classes absent from both targets and predictions (union 0) are left
    out of the mean (NaN in ``iou_per_class``), the mmseg convention.
    """

    higher_is_better = True

    def __init__(self, num_classes: int = len(VOC_CLASSES), ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)  # rows: target

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        for what, values in (("target", target), ("prediction", pred)):
            bad = values[(values < 0) | (values >= k)]
            if bad.numel():
                raise ValueError(f"{what} class {int(bad[0])} outside [0, {k}) (and not ignore {self.ignore_index})")
        self.confusion += torch.bincount(target * k + pred, minlength=k * k).view(k, k)

    def compute(self) -> dict:
        conf = self.confusion.double()
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        present = ~torch.isnan(iou)
        total = conf.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou_per_class": [None if torch.isnan(v) else float(v) for v in iou],
            "num_pixels": int(total),
        }


# ---------------------------------------------------------------------------------------------- protocol
@dataclass
class SegProbeConfig:
    """Segmentation options: number of classes and the ignore label."""

    num_classes: int = len(VOC_CLASSES)
    ignore_index: int = IGNORE_INDEX


def seg_target(sample: SegSample, tf, grid_hw: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label at the feature cells (nearest); cells outside the image (padding) are ``ignore_index``."""
    label = torch.from_numpy(sample.label.astype(np.int64))[None].float()
    out, inside = sample_frame_grid(label, tf, grid_hw, "nearest")
    out = out[0].round().long()
    out[~inside] = ignore_index
    return out


def _ce_loss(ignore_index: int):
    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not bool((target != ignore_index).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, ignore_index=ignore_index)

    return loss_fn


def train_segmentation_probe(extractor: Extractor, dataset: Sequence, spec: FeatureSpec, train: ProbeTrainConfig,
                             config: SegProbeConfig | None = None, cache=None, device=None,
                             progress: bool = True) -> tuple[SegmentationProbe, list[float]]:
    """Extract (or read cached) features, then fit a :class:`SegmentationProbe` with cross-entropy."""
    config = config or SegProbeConfig()
    feats, targets = collect_features(
        extractor, dataset, spec, lambda s, tf, f: seg_target(s, tf, tuple(f.shape[-2:]), config.ignore_index),
        cache, desc="seg features (train)", progress=progress)
    probe = seeded_module(lambda: SegmentationProbe(feats[0].shape[0], config.num_classes), train.seed)
    if train.standardize:
        probe.norm.fit(feats)
    history = train_probe(probe, feats, torch.stack(targets), _ce_loss(config.ignore_index), train, device,
                          "seg probe", progress)
    return probe, history


@torch.no_grad()
def evaluate_segmentation_probe(extractor: Extractor, probe: SegmentationProbe, dataset: Sequence, spec: FeatureSpec,
                                config: SegProbeConfig | None = None, cache=None, device=None,
                                progress: bool = True) -> dict:
    """Per-cell argmax, nearest-neighbour upsampled to each original label, scored with :class:`MeanIoU`."""
    config = config or SegProbeConfig()
    device = torch.device(device) if device is not None else torch.device("cpu")
    probe = probe.to(device).eval()
    metric = MeanIoU(config.num_classes, config.ignore_index)
    for _, samples, tfs, batch in iter_features(extractor, dataset, spec, cache, desc="seg features (eval)",
                                                progress=progress):
        cells = probe(batch.to(device)).argmax(dim=1).cpu()
        for sample, tf, c in zip(samples, tfs, cells):
            full, inside = sample_original(c[None].float(), tf, "nearest")
            label = torch.from_numpy(sample.label.astype(np.int64))
            label = torch.where(inside, label, torch.full_like(label, config.ignore_index))
            metric.update(full[0].round().long(), label)
    return metric.compute()


def run_segmentation_probe(extractor: Extractor, train_set: Sequence, eval_set: Sequence,
                           spec: FeatureSpec | None = None, train: ProbeTrainConfig | None = None,
                           config: SegProbeConfig | None = None, cache_dir: str | Path | None = None, device=None,
                           progress: bool = True, save_path: str | Path | None = None) -> ProbeResult:
    """Train on ``train_set``, evaluate mIoU on ``eval_set``; optionally save the probe (safetensors)."""
    spec, train, config = spec or FeatureSpec(), train or ProbeTrainConfig(), config or SegProbeConfig()
    train_cache = open_cache(cache_dir, lambda: feature_settings(extractor, spec, dataset_id(train_set)))
    eval_cache = open_cache(cache_dir, lambda: feature_settings(extractor, spec, dataset_id(eval_set)))
    probe, history = train_segmentation_probe(extractor, train_set, spec, train, config, train_cache, device, progress)
    metrics = evaluate_segmentation_probe(extractor, probe, eval_set, spec, config, eval_cache, device, progress)
    run_config = {"probe": probe.config, "features": asdict(spec), "train": asdict(train), "seg": asdict(config),
                  "train_set": dataset_id(train_set), "eval_set": dataset_id(eval_set)}
    weights = str(save_probe(probe, save_path, run_config)) if save_path else None
    return ProbeResult("seg", metrics, run_config, history, probe, weights)
