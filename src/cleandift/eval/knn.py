"""ImageNet-style kNN classification on pooled diffusion features (paper §4.5).

Protocol: every image's tap map is globally average-pooled (the paper says "pooled"; average is our
named default, ``KNNConfig.readout`` picks another readout of :mod:`.pooling`), train and query
vectors are L2-normalised, and each query takes the majority class of its ``k = 10`` most
cosine-similar training images. ``weighting="temperature"`` instead sums
``exp(sim / T)`` per class (DINO's weighted kNN, ``T = 0.07``).

Tie-breaking (majority vote): among the classes with the most votes, the one whose best-ranked
neighbour is most similar wins -- deterministic, and what a 1-NN would say among the tied classes.

Layout (torchvision ``ImageFolder``)::

    root/train/<class>/*.jpg
    root/val/<class>/*.jpg         # class folders must also exist in train/ (matched by name)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DatasetError
from ..images import IMAGE_SUFFIXES, load_image
from .pooling import READOUTS, Readout
from .probe_common import (
    Extractor, FeatureSpec, ProbeResult, collect_features, dataset_id, feature_settings, open_cache,
)

Weighting = Literal["majority", "temperature"]


@dataclass
class ClassSample:
    name: str
    image: Image.Image
    label: int


# ---------------------------------------------------------------------------------------------- dataset
class ImageFolderDataset:
    """``root[/<split>]/<class>/<image>``; ``classes`` (e.g. the train split's) fixes the label order.

    Raises :class:`DatasetError` for a missing split folder, an empty split, or a class folder that
    is not among ``classes``.
    """

    def __init__(self, root: str | Path, split: str | None = None, classes: Sequence[str] | None = None) -> None:
        root = Path(root).expanduser()
        self.base = root / split if split else root
        if not self.base.is_dir():
            raise DatasetError(f"{self.base}: folder not found (layout: <root>/<split>/<class>/<image>)")
        found = sorted(p.name for p in self.base.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = list(classes) if classes is not None else found
        unknown = [c for c in found if c not in self.classes]
        if unknown:
            raise DatasetError(f"{self.base / unknown[0]}: class folder not among the training classes "
                               f"({len(self.classes)} classes)")
        index = {c: i for i, c in enumerate(self.classes)}
        self.items: list[tuple[Path, int]] = []
        for cls in found:
            files = sorted(p for p in (self.base / cls).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            self.items.extend((p, index[cls]) for p in files)
        if not self.items:
            raise DatasetError(f"{self.base}: no images found (expected <class>/<image> with one of "
                               f"{', '.join(IMAGE_SUFFIXES[:4])}, ...)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> ClassSample:
        path, label = self.items[k]
        return ClassSample(path.relative_to(self.base).as_posix(), load_image(path), label)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.items], dtype=torch.long)

    def describe(self) -> str:
        return f"imagefolder:{self.base}"


# ---------------------------------------------------------------------------------------------- classifier
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor, k: int = 10,
                num_classes: int | None = None, weighting: Weighting = "majority", temperature: float = 0.07,
                chunk_size: int = 1024) -> torch.Tensor:
    """Predicted class ``(Q,)`` of each query by kNN over cosine similarity.

    Args:
        train_feats, query_feats: ``(N, C)`` / ``(Q, C)`` (normalised here).
        train_labels: ``(N,)`` integer classes.
        k: neighbours (clamped to ``N``).
        weighting: ``majority`` (one vote each) or ``temperature`` (``exp(sim / temperature)``, DINO).
        chunk_size: queries per similarity block (bounds memory to ``chunk_size x N``).
    """
    if train_feats.ndim != 2 or query_feats.ndim != 2 or train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"expected (N, C) and (Q, C) features, got {tuple(train_feats.shape)} and "
                         f"{tuple(query_feats.shape)}")
    if len(train_labels) != len(train_feats):
        raise ValueError(f"{len(train_labels)} labels for {len(train_feats)} training features")
    if weighting not in ("majority", "temperature"):
        raise ValueError(f"weighting must be 'majority' or 'temperature', got {weighting!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(train_feats))
    num_classes = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    train_n = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(train_n.device)
    out = []
    for start in range(0, len(query_feats), chunk_size):
        q = F.normalize(query_feats[start:start + chunk_size].float().to(train_n.device), dim=1)
        sims, idx = _topk_sorted(q @ train_n.T, k)
        out.append(_vote(sims, labels[idx], num_classes, weighting, temperature))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _topk_sorted(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by similarity, ties within the selection ordered by training index (deterministic ranks)."""
    sims, idx = sim.topk(k, dim=1)
    # Stable re-sort on (-similarity, index): sort by index first, then stably by similarity.
    by_index = idx.argsort(dim=1)
    sims, idx = sims.gather(1, by_index), idx.gather(1, by_index)
    order = sims.argsort(dim=1, descending=True, stable=True)
    return sims.gather(1, order), idx.gather(1, order)


def _vote(sims: torch.Tensor, nn_labels: torch.Tensor, num_classes: int, weighting: str,
          temperature: float) -> torch.Tensor:
    q, k = nn_labels.shape
    weights = torch.ones_like(sims) if weighting == "majority" else torch.exp(sims / temperature)
    scores = torch.zeros(q, num_classes, dtype=torch.float64, device=sims.device)
    scores.scatter_add_(1, nn_labels, weights.double())
    ranks = torch.arange(k, device=sims.device).expand(q, k)
    first = torch.full((q, num_classes), k, dtype=torch.long, device=sims.device)
    first.scatter_reduce_(1, nn_labels, ranks, reduce="amin")
    tied = scores == scores.max(dim=1, keepdim=True).values
    return torch.where(tied, first, torch.full_like(first, k + 1)).argmin(dim=1)


class KNNAccuracy:
    """Top-1 accuracy of predicted labels (update / compute / reset)."""

    higher_is_better = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        self.correct += int((pred.long().cpu() == target.long().cpu()).sum())
        self.total += int(target.numel())

    def compute(self) -> dict:
        if self.total == 0:
            raise ValueError("KNNAccuracy: no samples were seen")
        return {"top1": self.correct / self.total, "num_samples": self.total}


# ---------------------------------------------------------------------------------------------- protocol
@dataclass
class KNNConfig:
    """kNN options (paper: k = 10, cosine; majority vote is our default, ``temperature`` is DINO's).

    ``readout`` turns each tap map into a vector (:mod:`.pooling`); ``avg`` is the protocol's.
    """

    k: int = 10
    weighting: Weighting = "majority"
    temperature: float = 0.07
    readout: Readout = "avg"

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"unknown kNN readout {self.readout!r}; choose one of {', '.join(READOUTS)}")


def pooled_features(extractor: Extractor, dataset: Sequence, spec: FeatureSpec, cache=None,
                    progress: bool = True, desc: str = "knn features", readout: Readout = "avg"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features ``(N, D)`` (global average by default) and labels ``(N,)`` of a labelled dataset."""
    feats, labels = collect_features(extractor, dataset, spec, lambda s, tf, f: s.label, cache, pool=readout,
                                     desc=desc, progress=progress)
    return torch.stack(list(feats)), torch.tensor(labels, dtype=torch.long)


def run_knn(extractor: Extractor, train_set: Sequence, eval_set: Sequence, spec: FeatureSpec | None = None,
            config: KNNConfig | None = None, cache_dir: str | Path | None = None,
            progress: bool = True) -> ProbeResult:
    """Pool features of both splits, classify ``eval_set`` by kNN over ``train_set``, report top-1."""
    spec, config = spec or FeatureSpec(), config or KNNConfig()
    readout = config.readout
    caches = [open_cache(cache_dir, lambda d=d: feature_settings(extractor, spec, dataset_id(d), readout))
              for d in (train_set, eval_set)]
    train_x, train_y = pooled_features(extractor, train_set, spec, caches[0], progress, "knn features (train)",
                                       readout)
    query_x, query_y = pooled_features(extractor, eval_set, spec, caches[1], progress, "knn features (eval)",
                                       readout)
    num_classes = len(getattr(train_set, "classes", [])) or int(max(train_y.max(), query_y.max())) + 1
    pred = knn_predict(train_x, train_y, query_x, config.k, num_classes, config.weighting, config.temperature)
    metric = KNNAccuracy()
    metric.update(pred, query_y)
    run_config = {"features": asdict(spec), "knn": asdict(config), "pool": readout,
                  "train_set": dataset_id(train_set), "eval_set": dataset_id(eval_set)}
    return ProbeResult("knn", metric.compute(), run_config)
