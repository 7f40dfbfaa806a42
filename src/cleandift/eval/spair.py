"""SPair-71k reader for its official on-disk layout.

Layout (``SPair-71k.tar.gz`` from POSTECH, unchanged)::

    <root>/JPEGImages/<category>/<name>.jpg
    <root>/ImageAnnotation/<category>/<name>.json          # "kps": {"0": [x, y] | null, ...}
    <root>/PairAnnotation/{trn,val,test}/<pairid>-<src>-<trg>:<category>.json

Pair annotation fields used: ``src_imname``, ``trg_imname``, ``src_imsize`` / ``trg_imsize``
(``[W, H, C]``), ``src_bndbox`` / ``trg_bndbox`` (``[x1, y1, x2, y2]``), ``category``, ``src_kps`` /
``trg_kps`` (``[[x, y], ...]``, only the keypoints visible in *both* images), ``kps_ids`` (their
ids in the category's keypoint list). Other fields (``mirror``, ``viewpoint_variation``, ...) are
kept in ``pair.extra``. Keypoints are used as stored, as pixel-index coordinates of the original
image (what DIFT, SD-DINO and TLFR do). Pairs are read from ``PairAnnotation/<split>/*.json``
(DIFT's ``eval_spair.py``), sorted by category then pair id.

Every problem raises :class:`~cleandift.errors.DatasetError` naming the file: a missing folder,
annotation or image, unreadable JSON, a missing field, a category that is not one of the 18, a
file name / ``category`` disagreement, keypoint lists of different lengths, keypoints outside the
image, or an empty split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch

from ..errors import DatasetError
from .pairs import CorrespondencePair, as_keypoints, check_bbox, check_inside

SPAIR_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog", "horse",
    "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)
SPAIR_SPLITS: tuple[str, ...] = ("trn", "val", "test")
_SPLIT_ALIASES = {"train": "trn", "training": "trn", "validation": "val", "testing": "test"}
_REQUIRED = ("src_imname", "trg_imname", "src_imsize", "trg_imsize", "src_bndbox", "trg_bndbox", "category",
             "src_kps", "trg_kps")


def normalize_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPAIR_SPLITS:
        raise DatasetError(f"unknown SPair-71k split {split!r}; choose from {', '.join(SPAIR_SPLITS)}")
    return split


def check_categories(categories: Sequence[str] | None, known: Sequence[str] = SPAIR_CATEGORIES
                     ) -> tuple[str, ...]:
    """The requested categories (all by default), or :class:`DatasetError` listing the valid names."""
    if not categories:
        return tuple(known)
    unknown = [c for c in categories if c not in known]
    if unknown:
        noun = "category" if len(unknown) == 1 else "categories"
        raise DatasetError(f"unknown {noun} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    return tuple(dict.fromkeys(categories))


def read_spair(root: str | Path, split: str = "test", categories: Sequence[str] | None = None,
               limit: int | None = None) -> list[CorrespondencePair]:
    """All pairs of a split.

    Args:
        root: the ``SPair-71k`` folder.
        split: ``trn`` / ``val`` / ``test`` (``train`` is accepted for ``trn``).
        categories: restrict to these categories (default: all 18).
        limit: at most this many pairs *per category* (the first ones in pair-id order).
    """
    root = Path(root).expanduser()
    split = normalize_split(split)
    wanted = check_categories(categories)
    folder = root / "PairAnnotation" / split
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found; expected the SPair-71k layout "
                           "<root>/{JPEGImages,ImageAnnotation,PairAnnotation/{trn,val,test}} under --root")
    by_category: dict[str, list[Path]] = {}
    for path in folder.glob("*.json"):
        category = path.stem.rsplit(":", 1)[-1] if ":" in path.stem else None
        if category is None:
            raise DatasetError(f"{path}: pair annotation name must end in ':<category>.json'")
        if category not in SPAIR_CATEGORIES:
            raise DatasetError(f"{path}: unknown category {category!r}; "
                               f"SPair-71k has {', '.join(SPAIR_CATEGORIES)}")
        by_category.setdefault(category, []).append(path)
    pairs: list[CorrespondencePair] = []
    for category in wanted:
        files = sorted(by_category.get(category, []), key=_natural_key)
        if limit is not None:
            files = files[:max(0, int(limit))]
        pairs.extend(read_spair_pair(p, root) for p in files)
    if not pairs:
        which = f" for categories {', '.join(wanted)}" if categories else ""
        raise DatasetError(f"{folder}: no pair annotations{which} (empty split); check --root and --split")
    return pairs


def read_spair_pair(path: str | Path, root: str | Path) -> CorrespondencePair:
    """One ``PairAnnotation`` JSON file -> :class:`CorrespondencePair` (validated)."""
    path, root = Path(path), Path(root)
    data = _read_json(path)
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise DatasetError(f"{path}: missing field(s) {', '.join(missing)} "
                           "(not a SPair-71k pair annotation?)")
    category = str(data["category"])
    if category not in SPAIR_CATEGORIES:
        raise DatasetError(f"{path}: unknown category {category!r}; "
                           f"SPair-71k has {', '.join(SPAIR_CATEGORIES)}")
    if ":" in path.stem and path.stem.rsplit(":", 1)[-1] != category:
        raise DatasetError(f"{path}: file name says category {path.stem.rsplit(':', 1)[-1]!r} "
                           f"but the annotation says {category!r}")
    src_size = _imsize(data["src_imsize"], path, "src_imsize")
    trg_size = _imsize(data["trg_imsize"], path, "trg_imsize")
    src_kps = as_keypoints(data["src_kps"], path, "src_kps")
    trg_kps = as_keypoints(data["trg_kps"], path, "trg_kps")
    if src_kps.shape != trg_kps.shape:
        raise DatasetError(f"{path}: src_kps has {len(src_kps)} keypoints but trg_kps has {len(trg_kps)}")
    kps_ids = data.get("kps_ids")
    if kps_ids is not None:
        try:
            kps_ids = tuple(int(k) for k in kps_ids)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: kps_ids must be integers ({exc})") from exc
        if len(kps_ids) != len(src_kps):
            raise DatasetError(f"{path}: {len(kps_ids)} kps_ids for {len(src_kps)} keypoints")
    check_inside(src_kps, src_size, path, "source keypoint")
    check_inside(trg_kps, trg_size, path, "target keypoint")
    src_name, trg_name = str(data["src_imname"]), str(data["trg_imname"])
    src_image = root / "JPEGImages" / category / src_name
    trg_image = root / "JPEGImages" / category / trg_name
    for image in (src_image, trg_image):
        if not image.is_file():
            raise DatasetError(f"{image}: image file not found (referenced by {path})")
    extra = {k: v for k, v in data.items() if k not in _REQUIRED and k != "kps_ids"}
    extra["src_annotation"] = root / "ImageAnnotation" / category / (Path(src_name).stem + ".json")
    extra["trg_annotation"] = root / "ImageAnnotation" / category / (Path(trg_name).stem + ".json")
    return CorrespondencePair(
        pair_id=path.stem, category=category,
        src_id=f"{category}/{Path(src_name).stem}", trg_id=f"{category}/{Path(trg_name).stem}",
        src_image=src_image, trg_image=trg_image, src_size=src_size, trg_size=trg_size,
        src_kps=src_kps, trg_kps=trg_kps,
        src_bbox=check_bbox(data["src_bndbox"], path, "src_bndbox"),
        trg_bbox=check_bbox(data["trg_bndbox"], path, "trg_bndbox"),
        kps_ids=kps_ids, annotation=path, extra=extra,
    )


def read_image_keypoints(path: str | Path, num_keypoints: int | None = None) -> torch.Tensor:
    """All keypoints of an ``ImageAnnotation`` file: ``(K, 2)`` with NaN rows for ``null`` (invisible).

    Needed by pair-dependent descriptors (TLFR's adaptive flip maps left/right keypoints through all
    annotated source keypoints, not only the mutually visible ones of the pair).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image annotation file not found")
    kps = _read_json(path).get("kps")
    if not isinstance(kps, dict):
        raise DatasetError(f"{path}: no 'kps' dict (expected {{\"0\": [x, y] or null, ...}})")
    try:
        ids = sorted(int(k) for k in kps)
    except ValueError as exc:
        raise DatasetError(f"{path}: keypoint ids must be integers ({exc})") from exc
    k = max(num_keypoints or 0, (ids[-1] + 1) if ids else 0)
    out = torch.full((k, 2), float("nan"))
    for key, xy in kps.items():
        if xy is not None:
            out[int(key)] = as_keypoints([xy], path, f"kps[{key}]")[0]
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return data


def _imsize(value, path: Path, what: str) -> tuple[int, int]:
    """SPair stores ``[W, H, C]``; return ``(H, W)``."""
    try:
        w, h = int(value[0]), int(value[1])
    except (TypeError, ValueError, IndexError) as exc:
        raise DatasetError(f"{path}: {what} must be [W, H, C] ({exc})") from exc
    if w <= 0 or h <= 0:
        raise DatasetError(f"{path}: {what} must be positive, got {value}")
    return h, w


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))
