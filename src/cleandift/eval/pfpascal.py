"""PF-Pascal reader for the pair CSVs every semantic-correspondence codebase uses.

Assumed layout (``PF-dataset-PASCAL.zip`` from the Proposal Flow page plus the pair lists of
cnngeometric / GeoAware-SC's ``prepare_pfpascal.sh``)::

    <root>/JPEGImages/<name>.jpg
    <root>/{test,val}_pairs_pf_pascal.csv

CSV: a header row (``source_image,target_image,class,XA,YA,XB,YB``) then one pair per row -- source
path, target path, class id **1-20** (VOC order, :data:`PF_PASCAL_CATEGORIES`), and the source /
target keypoint coordinates ``XA``, ``YA``, ``XB``, ``YB`` as ``;``-separated numbers (``XA[k],
YA[k]`` in the source corresponds to ``XB[k], YB[k]`` in the target). Image paths in the CSVs are
relative to the *parent* of the dataset folder (``PF-dataset-PASCAL/JPEGImages/x.jpg``); they are
looked up there, then relative to ``<root>``, then as ``<root>/JPEGImages/<file name>``.

Assumptions, documented because no official devkit pins them:

* coordinates are used as stored (as GeoAware-SC / SD-DINO do; the annotations come from MATLAB and
  may be 1-based -- a constant offset of at most one pixel, identical for every method);
* the PCK threshold is ``alpha * max(H, W)`` of the target image (``img``); PF-Pascal pairs have no
  boxes in the CSV, so ``bbox`` PCK is not available;
* the training list (``trn_pairs_pf_pascal.csv``) has no keypoint columns and is rejected;
* ``split`` may also be a path to a CSV file in the same format.

Problems raise :class:`~cleandift.errors.DatasetError` naming the file (and CSV line).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import torch

from ..errors import DatasetError
from .pairs import CorrespondencePair, check_inside, image_size_of
from .spair import check_categories

PF_PASCAL_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PF_PASCAL_SPLITS: tuple[str, ...] = ("test", "val")


def split_file(root: Path, split: str) -> Path:
    """The CSV of a split: ``<root>/<split>_pairs_pf_pascal.csv`` (or ``split`` itself if a ``.csv``)."""
    if split.endswith(".csv"):
        return Path(split).expanduser()
    if split in ("trn", "train"):
        raise DatasetError(f"{root}: the PF-Pascal training list has no keypoint columns; evaluate on "
                           f"{' or '.join(PF_PASCAL_SPLITS)}")
    if split not in PF_PASCAL_SPLITS:
        raise DatasetError(f"unknown PF-Pascal split {split!r}; choose from {', '.join(PF_PASCAL_SPLITS)} "
                           "or pass a CSV file")
    return root / f"{split}_pairs_pf_pascal.csv"


def read_pfpascal(root: str | Path, split: str = "test", categories: Sequence[str] | None = None,
                  limit: int | None = None) -> list[CorrespondencePair]:
    """All pairs of a split CSV (``limit``: at most that many pairs per category, in CSV order)."""
    root = Path(root).expanduser()
    path = split_file(root, split)
    wanted = check_categories(categories, PF_PASCAL_CATEGORIES)
    if not path.is_file():
        raise DatasetError(f"{path}: pair list not found; expected <root>/{{test,val}}_pairs_pf_pascal.csv "
                           "(see cleandift.eval.pfpascal for the layout)")
    rows = _read_rows(path)
    pairs: list[CorrespondencePair] = []
    taken: dict[str, int] = {}
    for line, row in rows:
        category = _category(row[2], path, line)
        if category not in wanted or (limit is not None and taken.get(category, 0) >= limit):
            continue
        taken[category] = taken.get(category, 0) + 1
        pairs.append(_pair(row, line, path, root, category))
    if not pairs:
        which = f" for categories {', '.join(wanted)}" if categories else ""
        raise DatasetError(f"{path}: no pairs{which} (empty split)")
    return pairs


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [(i + 1, [c.strip() for c in row]) for i, row in enumerate(csv.reader(f))
                    if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: unreadable CSV ({exc})") from exc
    if rows and not _is_int(rows[0][1][2] if len(rows[0][1]) > 2 else ""):
        header = rows.pop(0)[1]
        if len(header) < 7:
            raise DatasetError(f"{path}: header {header} has no keypoint columns XA, YA, XB, YB "
                               "(the training list cannot be evaluated)")
    for line, row in rows:
        if len(row) < 7:
            raise DatasetError(f"{path}:{line}: expected 7 columns (source, target, class, XA, YA, XB, YB), "
                               f"got {len(row)}")
    return rows


def _category(value: str, path: Path, line: int) -> str:
    if not _is_int(value) or not 1 <= int(value) <= len(PF_PASCAL_CATEGORIES):
        raise DatasetError(f"{path}:{line}: class must be an integer id 1-{len(PF_PASCAL_CATEGORIES)}, "
                           f"got {value!r}")
    return PF_PASCAL_CATEGORIES[int(value) - 1]


def _pair(row: list[str], line: int, path: Path, root: Path, category: str) -> CorrespondencePair:
    where = Path(f"{path}:{line}")
    src_image, trg_image = _resolve(row[0], root, where), _resolve(row[1], root, where)
    src_kps = _coords(row[3], row[4], where, "XA/YA")
    trg_kps = _coords(row[5], row[6], where, "XB/YB")
    if src_kps.shape != trg_kps.shape:
        raise DatasetError(f"{where}: {len(src_kps)} source but {len(trg_kps)} target keypoints")
    src_size, trg_size = image_size_of(src_image, where), image_size_of(trg_image, where)
    check_inside(src_kps, src_size, where, "source keypoint")
    check_inside(trg_kps, trg_size, where, "target keypoint")
    return CorrespondencePair(
        pair_id=f"row{line}", category=category,
        src_id=f"{category}/{src_image.stem}", trg_id=f"{category}/{trg_image.stem}",
        src_image=src_image, trg_image=trg_image, src_size=src_size, trg_size=trg_size,
        src_kps=src_kps, trg_kps=trg_kps, src_bbox=None, trg_bbox=None, kps_ids=None, annotation=where,
        extra={"csv": str(path), "line": line},
    )


def _resolve(name: str, root: Path, where: Path) -> Path:
    rel = Path(name.replace("\\", "/"))
    candidates = [root.parent / rel, root / rel, root / "JPEGImages" / rel.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{where}: image file not found: {name} "
                       f"(looked for {', '.join(map(str, candidates))})")


def _coords(xs: str, ys: str, where: Path, what: str) -> torch.Tensor:
    try:
        x = [float(v) for v in xs.split(";") if v.strip()]
        y = [float(v) for v in ys.split(";") if v.strip()]
    except ValueError as exc:
        raise DatasetError(f"{where}: {what} must be ';'-separated numbers ({exc})") from exc
    if len(x) != len(y):
        raise DatasetError(f"{where}: {what} have {len(x)} x but {len(y)} y values")
    kps = torch.tensor(list(zip(x, y)), dtype=torch.float32).reshape(-1, 2)
    if not torch.isfinite(kps).all():
        raise DatasetError(f"{where}: {what} contain non-finite values")
    return kps


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
