"""Semantic-correspondence evaluation: pairs -> per-image descriptors (cached) -> matches -> PCK.

The loop (DIFT's advice, #12: extract every image once, then match pairs):

1. each image is read, put into the descriptor's frame (``descriptor.size`` / ``descriptor.resize``)
   and described **once** -- features come from the per-image cache when present
   (:class:`~cleandift.eval.cache.FeatureCache`; without a cache folder a temporary one is used for
   the run, so memory stays bounded);
2. the source keypoints (original pixels) are matched into the target with
   :func:`~cleandift.eval.matching.match_points` (or the descriptor's own ``match_pair``); the
   transforms original -> descriptor frame are applied inside, so predictions come back in the
   original target frame;
3. :class:`~cleandift.eval.pck.PCK` accumulates them against the target keypoints, per keypoint and
   per image, overall and per category.

The result carries the resolved settings and the descriptor's ``describe()``, and is written as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import DatasetError
from ..images import ResizeTransform, image_to_tensor, load_image, resize_image
from ..version import __version__
from .cache import FeatureCache
from .descriptors import DenseDescriptor, PairContext
from .matching import match_points
from .pairs import CorrespondencePair
from .pck import PCK, pck_key
from .presets import CorrespondenceSettings, feature_method

log = logging.getLogger(__name__)


@dataclass
class CorrespondenceResult:
    """Outcome of an evaluation: labelled PCK values plus everything needed to reproduce them."""

    results: dict
    per_category: dict
    settings: dict
    descriptor: dict
    dataset: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    #: what produced the features (:func:`~cleandift.eval.presets.feature_method`): noisy | clean | naive-clean
    method: str | None = None
    #: a name for this run given by the user (``eval --label``); plots use it
    label: str | None = None

    def to_dict(self) -> dict:
        out = {"cleandift_version": __version__, "dataset": self.dataset, "method": self.method,
               "results": self.results, "per_category": self.per_category, "protocol": self.protocol,
               "settings": self.settings, "descriptor": self.descriptor, "timing": self.timing}
        if self.label:
            out["label"] = self.label
        return out

    def write(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (temp file + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_finite(self.to_dict()), f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
        return path

    def table(self, alpha: float = 0.1) -> str:
        """Text table: all alphas overall, then per category at ``alpha``."""
        return format_table(self.results, self.per_category, alpha)


class FeatureStore:
    """Per-image descriptors for a run: disk cache, a small in-memory LRU, one extraction per image.

    Args:
        descriptor: the dense descriptor.
        prompt_for: ``category -> prompt`` (``None`` / ``""`` = unconditional).
        cache: a :class:`FeatureCache` (``None``: a temporary one, deleted by :meth:`close`).
        memory_items: feature maps kept in memory (SPair images recur across a category's pairs).
    """

    def __init__(self, descriptor: DenseDescriptor, prompt_for, cache: FeatureCache | None = None,
                 memory_items: int = 32, cache_settings: dict | None = None) -> None:
        self.descriptor = descriptor
        self.prompt_for = prompt_for
        self._tmp = None
        if cache is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cleandift-features-")
            cache = FeatureCache(self._tmp.name, cache_settings or {"descriptor": descriptor.describe()})
        self.cache = cache
        self.memory_items = memory_items
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._transforms: dict[tuple[int, int], ResizeTransform] = {}
        self._keypoints: dict[str, torch.Tensor | None] = {}
        self.extracted = 0
        self.loaded = 0

    def transform(self, size_hw: tuple[int, int]) -> ResizeTransform:
        """Original ``(H, W)`` -> descriptor frame (computed on a blank image, no pixels needed)."""
        key = (int(size_hw[0]), int(size_hw[1]))
        if key not in self._transforms:
            from PIL import Image  # noqa: PLC0415

            blank = Image.new("L", (key[1], key[0]))
            _, tf = resize_image(blank, self.descriptor.size, self.descriptor.resize)
            self._transforms[key] = tf
        return self._transforms[key]

    def image_keypoints(self, image_id: str, annotation: Path | None) -> torch.Tensor | None:
        """All annotated keypoints of an image (SPair ``ImageAnnotation``; NaN = invisible), or ``None``.

        For pair-dependent descriptors (TLFR's flip needs the left/right partners of the queried
        keypoints). A missing file is logged once per image and yields ``None``.
        """
        if annotation is None:
            return None
        if image_id not in self._keypoints:
            from .spair import read_image_keypoints  # noqa: PLC0415

            try:
                self._keypoints[image_id] = read_image_keypoints(annotation)
            except DatasetError as exc:
                log.warning("%s; pair-dependent matching continues without all source keypoints", exc)
                self._keypoints[image_id] = None
        return self._keypoints[image_id]

    def get(self, image_id: str, path: Path, category: str, size_hw: tuple[int, int],
            flipped: bool = False) -> torch.Tensor:
        """``(C, h, w)`` descriptor of an image (its left-right mirror in the frame if ``flipped``)."""
        key = f"{image_id}@flip" if flipped else image_id
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        feats = self.cache.get(key)
        if feats is None:
            feats = self._extract(path, category, size_hw, flipped)
            self.cache.put(key, feats)
            self.extracted += 1
        else:
            self.loaded += 1
        self._memory[key] = feats
        if len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return feats

    def _extract(self, path: Path, category: str, size_hw: tuple[int, int], flipped: bool) -> torch.Tensor:
        img = load_image(path)
        if (img.height, img.width) != tuple(size_hw):
            raise DatasetError(f"{path}: image is {img.width}x{img.height} but its annotation says "
                               f"{size_hw[1]}x{size_hw[0]} (W x H); the annotation does not match the image")
        resized, _ = resize_image(img, self.descriptor.size, self.descriptor.resize)
        batch = image_to_tensor(resized)[None]
        if flipped:
            batch = torch.flip(batch, dims=[-1])
        with torch.no_grad():
            out = self.descriptor(batch, self.prompt_for(category))
        if out.ndim != 4 or out.shape[0] != 1:
            raise ValueError(f"descriptor returned {tuple(out.shape)}, expected (1, C, h, w)")
        return out[0].detach().float()

    def close(self) -> None:
        self._memory.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def evaluate_pairs(pairs: Sequence[CorrespondencePair], descriptor: DenseDescriptor,
                   settings: CorrespondenceSettings, cache_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> CorrespondenceResult:
    """Evaluate a descriptor on pairs with the matching and PCK options of ``settings``.

    Args:
        pairs: from :func:`~cleandift.eval.spair.read_spair` / :func:`~cleandift.eval.pfpascal.read_pfpascal`.
        descriptor: anything satisfying :class:`~cleandift.eval.descriptors.DenseDescriptor`.
        settings: resolved settings (matching: ``method, grid, source, window, temperature``; PCK:
            ``alphas, thresholds, comparison``; ``prompt`` template).
        cache_dir: feature cache root; an interrupted run resumes from it. ``None``: temporary.
    """
    if not pairs:
        raise DatasetError("no pairs to evaluate")
    if not isinstance(descriptor, DenseDescriptor):
        raise TypeError(f"{type(descriptor).__name__} is not a dense descriptor "
                        "(needs size, resize, __call__, describe)")
    described = descriptor.describe()
    cache_settings = {"descriptor": described, "size": descriptor.size, "resize": descriptor.resize,
                      "prompt": settings.prompt}
    cache = FeatureCache(cache_dir, cache_settings) if cache_dir is not None else None
    store = FeatureStore(descriptor, settings.format_prompt, cache, cache_settings=cache_settings)
    metric = PCK(settings.alphas, settings.thresholds, settings.comparison)
    start = time.perf_counter()
    report_every = max(1, len(pairs) // 10)
    try:
        for i, pair in enumerate(pairs):
            pred = predict_pair(pair, descriptor, store, settings)
            metric.update(pred, pair.trg_kps, bbox=pair.trg_bbox if "bbox" in settings.thresholds else None,
                          image_size=pair.trg_size, category=pair.category)
            if progress and ((i + 1) % report_every == 0 or i + 1 == len(pairs)):
                elapsed = time.perf_counter() - start
                log.info("%d/%d pairs (%.1f s, %.2f s/pair)", i + 1, len(pairs), elapsed, elapsed / (i + 1))
    finally:
        extracted, loaded = store.extracted, store.loaded
        store.close()
    seconds = time.perf_counter() - start
    return CorrespondenceResult(
        results=metric.compute(), per_category=metric.compute_per_category(), settings=settings.as_dict(),
        descriptor=described,
        timing={"seconds": round(seconds, 3), "pairs": len(pairs), "images_extracted": extracted,
                "images_from_cache": loaded},
        protocol=describe_protocol(settings),
        method=feature_method(settings.mode, settings.checkpoint, settings.descriptor),
    )


def describe_protocol(settings: CorrespondenceSettings) -> dict:
    """Plain-language statement of how the numbers were computed (stored with every result)."""
    matching = (f"{settings.method} over the {settings.grid} of the target, cosine similarity, "
                f"{settings.source} source descriptor")
    if settings.method == "soft-argmax":
        matching += f", window +-{settings.window}, temperature {settings.temperature}"
    return {
        "values": "fraction of correct keypoints, 0-1 (the printed table shows percent)",
        "frame": "original target image, (x, y) pixel-index coordinates, pixel centres at integers",
        "correct": f"dist / threshold {settings.comparison} alpha (Euclidean distance in original pixels)",
        "bbox": "threshold = max(x2 - x1, y2 - y1) of the target bounding box",
        "img": "threshold = max(H, W) of the target image",
        "per-point": "correct keypoints / all keypoints, pooled over pairs",
        "per-image": "mean over pairs of each pair's fraction of correct keypoints",
        "matching": matching,
    }


def predict_pair(pair: CorrespondencePair, descriptor: DenseDescriptor, store: FeatureStore,
                 settings: CorrespondenceSettings) -> torch.Tensor:
    """Predicted target points ``(N, 2)`` (original target frame) for the pair's source keypoints."""
    src = store.get(pair.src_id, pair.src_image, pair.category, pair.src_size)
    trg = store.get(pair.trg_id, pair.trg_image, pair.category, pair.trg_size)
    src_tf, trg_tf = store.transform(pair.src_size), store.transform(pair.trg_size)
    match_pair = getattr(descriptor, "match_pair", None)
    if callable(match_pair):
        images = {pair.src_id: (pair.src_image, pair.src_size), pair.trg_id: (pair.trg_image, pair.trg_size)}

        def get_features(image_id: str, flipped: bool = False) -> torch.Tensor:
            if image_id not in images:
                raise KeyError(f"{image_id!r} is not an image of pair {pair.pair_id}")
            path, size = images[image_id]
            return store.get(image_id, path, pair.category, size, flipped=flipped)

        extra = {"pair": pair, **pair.extra}
        kps_all = store.image_keypoints(pair.src_id, pair.extra.get("src_annotation"))
        if kps_all is not None:
            extra["src_kps_all"] = kps_all
        ctx = PairContext(category=pair.category, src_id=pair.src_id, trg_id=pair.trg_id,
                          src_size=pair.src_size, trg_size=pair.trg_size, src_transform=src_tf,
                          trg_transform=trg_tf, kps_ids=pair.kps_ids, get_features=get_features, extra=extra)
        pred = torch.as_tensor(match_pair(src, trg, pair.src_kps, ctx), dtype=torch.float32).cpu()
    else:
        pred = match_points(src, trg, pair.src_kps, pair.src_size, pair.trg_size, method=settings.method,
                            grid=settings.grid, source=settings.source, window=settings.window,
                            temperature=settings.temperature, src_transform=src_tf, trg_transform=trg_tf)
    if pred.shape != pair.trg_kps.shape:
        raise ValueError(f"pair {pair.pair_id}: predicted {tuple(pred.shape)} points "
                         f"for {tuple(pair.trg_kps.shape)}")
    return pred


def read_pairs(settings: CorrespondenceSettings, root: str | os.PathLike) -> list[CorrespondencePair]:
    """The pairs of ``settings.dataset`` / ``split`` / ``categories`` / ``limit`` under ``root``."""
    if settings.dataset == "spair":
        from .spair import read_spair  # noqa: PLC0415

        return read_spair(root, settings.split, settings.categories, settings.limit)
    from .pfpascal import read_pfpascal  # noqa: PLC0415

    return read_pfpascal(root, settings.split, settings.categories, settings.limit)


def run_correspondence(settings: CorrespondenceSettings, root: str | os.PathLike,
                       out: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                       descriptor: DenseDescriptor | None = None,
                       progress: bool = True, load_kwargs: dict | None = None,
                       label: str | None = None) -> CorrespondenceResult:
    """Read the dataset, build the descriptor (unless given), evaluate, and write ``out`` (JSON).

    ``load_kwargs`` go to :func:`cleandift.backbones.load_backbone` (e.g. ``single_file_config``);
    ``label`` names the run in the result file (``viz curves`` uses it).
    """
    pairs = read_pairs(settings, root)  # first: dataset errors before any model loads
    if descriptor is None:
        from .presets import build_descriptor  # noqa: PLC0415

        descriptor = build_descriptor(settings, load_kwargs=load_kwargs)
    result = evaluate_pairs(pairs, descriptor, settings, cache_dir=cache_dir, progress=progress)
    result.dataset = {"name": settings.dataset, "root": str(Path(root).expanduser()), "split": settings.split,
                      "categories": sorted({p.category for p in pairs}), "pairs": len(pairs)}
    result.label = label
    if out is not None:
        result.write(out)
    return result


# ---------------------------------------------------------------------------------------------- output
def format_table(results: dict, per_category: dict, alpha: float = 0.1) -> str:
    """Overall PCK in percent for every alpha / threshold / aggregation, then a per-category table at ``alpha``
    (the results hold fractions; this text table multiplies by 100)."""
    labels = [k for k in results if k.startswith("pck@")]
    alphas = list(dict.fromkeys(k.split("/")[0][4:] for k in labels))
    columns = list(dict.fromkeys("/".join(k.split("/")[1:]) for k in labels))  # kind/average
    width = max([len(c) for c in columns] + [18])
    lines = ["PCK %".ljust(8) + "".join(c.rjust(width + 2) for c in columns)]
    for a in alphas:
        row = [results.get(f"pck@{a}/{c}", float("nan")) for c in columns]
        lines.append(f"@{a}".ljust(8) + "".join(_fmt(v).rjust(width + 2) for v in row))
    lines.append(f"pairs: {results.get('n_pairs', 0)}, keypoints: {results.get('n_keypoints', 0)}")
    if per_category:
        kinds = list(columns)
        title = f"alpha={alpha:g}"
        name_w = max([len(c) for c in per_category] + [len(title)]) + 2
        lines.append("")
        lines.append(title.ljust(name_w) +
                     "".join(c.rjust(width + 2) for c in kinds) + "pairs".rjust(8))
        for cat, vals in per_category.items():
            row = [vals.get(pck_key(alpha, *c.split("/")), float("nan")) for c in kinds]
            lines.append(cat.ljust(name_w) + "".join(_fmt(v).rjust(width + 2) for v in row) +
                         str(vals.get("n_pairs", 0)).rjust(8))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    """A PCK fraction as percent with two decimals."""
    return "n/a" if value != value else f"{100 * value:.2f}"


def _finite(value):
    """JSON has no NaN: write ``null`` for undefined PCK (no keypoints)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


__all__ = ["CorrespondenceResult", "FeatureStore", "evaluate_pairs", "predict_pair", "read_pairs",
           "run_correspondence", "format_table"]
