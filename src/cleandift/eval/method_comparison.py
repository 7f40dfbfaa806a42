"""Scoring feature methods side by side: kNN on pooled features and warp PCK, on small labelled images.

The engine of the offline comparison (``benchmarks/mini_comparison.py``) and of ``cleandift demo``. A
:class:`Method` is any feature extractor (noisy DIFT at some t, an ensemble, the frozen model on clean
input, the CleanDIFT student) plus its cost in U-Net passes; :func:`score_method` gives its kNN top-1
(globally average-pooled features, cosine, k = 10) and warp PCK@0.1 / @0.05 (:mod:`cleandift.eval.warp`)
for every tap, and the seconds per image its query extraction took.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..extract import CleanExtractor, NoisyExtractor
from ..pretrain.probe import knn_top1
from .warp import WarpConfig, WarpPairs, make_warp_pairs, predict_matches, warp_pck

FeatureFn = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


@dataclass
class Method:
    """A named way of getting features, with its cost in U-Net passes per image."""

    name: str
    family: str  # noisy | ensemble | naive-clean | clean-t0 | cleandift
    passes: int  # U-Net passes per image
    extract: FeatureFn
    t: int | None = None

    @classmethod
    def of(cls, name: str, family: str, extractor: CleanExtractor | NoisyExtractor) -> "Method":
        """Wrap an extractor (null prompt); passes and t are read off it."""
        noisy = isinstance(extractor, NoisyExtractor)
        t = extractor.t if noisy else round(extractor.timestep)
        return cls(name, family, extractor.ensemble if noisy else 1,
                   lambda images, g: extractor(images, prompts=None, generator=g), t)


@dataclass
class EvalSet:
    """One seed's data: a kNN bank, and queries that are also the sources of the warp pairs."""

    seed: int
    bank: torch.Tensor
    bank_labels: torch.Tensor
    pairs: WarpPairs
    query_labels: torch.Tensor


@dataclass
class Scores:
    knn: dict[str, float] = field(default_factory=dict)
    pck10: dict[str, float] = field(default_factory=dict)
    pck05: dict[str, float] = field(default_factory=dict)
    seconds_per_image: float = float("nan")


class ScoreCache:
    """Scores already computed, one JSON line per (seed, method), so a long comparison can resume.

    The full protocol takes hours of CPU; a run that is killed keeps every finished (seed, method).
    Lines carry a fingerprint of the settings that change the numbers: a cache written with other
    settings is ignored, never mixed in. A line cut short by a crash is skipped.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._scores: dict[tuple[int, str], Scores] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("fingerprint") == self.fingerprint:
                    self._scores[(int(row["seed"]), row["method"])] = Scores(**row["scores"])

    def __len__(self) -> int:
        return len(self._scores)

    def get(self, seed: int, method: str) -> Scores | None:
        return self._scores.get((seed, method))

    def put(self, seed: int, method: str, scores: Scores) -> None:
        """Record and append durably (flushed and fsynced before returning)."""
        self._scores[(seed, method)] = scores
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"fingerprint": self.fingerprint, "seed": seed, "method": method, "scores": asdict(scores)}
        torn = self.path.is_file() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(("\n" if torn else "") + json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def make_methods(backbone, student, student_t: float, taps: list[str], ts: list[int], naive_t: int,
                 chunk: int) -> dict[str, Method]:
    """The single-pass methods of the comparison: noisy at each t, naive clean, clean t=0, CleanDIFT."""
    methods = [Method.of(f"noisy t={t}", "noisy", NoisyExtractor(backbone, t=t, ensemble=1, taps=taps,
                                                                  chunk_size=chunk)) for t in ts]
    methods.append(Method.of(f"naive clean t={naive_t}", "naive-clean",
                             CleanExtractor(backbone, timestep=naive_t, taps=taps, chunk_size=chunk)))
    methods.append(Method.of("clean t=0", "clean-t0", CleanExtractor(backbone, timestep=0, taps=taps, chunk_size=chunk)))
    if student is not None:
        methods.append(Method.of("CleanDIFT", "cleandift", CleanExtractor(backbone, unet=student, timestep=student_t,
                                                                          taps=taps, chunk_size=chunk)))
    return {m.name: m for m in methods}


def ensemble_method(backbone, t: int, ensemble: int, taps: list[str], chunk: int) -> Method:
    ex = NoisyExtractor(backbone, t=t, ensemble=ensemble, taps=taps, chunk_size=max(1, chunk // ensemble))
    return Method.of(f"noisy ensemble {ensemble} t={t}", "ensemble", ex)


def make_eval_set(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], seed: int,
              n_bank: int, n_queries: int, n_points: int, warp: WarpConfig) -> EvalSet:
    g = torch.Generator().manual_seed(seed)
    bi = torch.randperm(len(train[0]), generator=g)[:n_bank]
    qi = torch.randperm(len(test[0]), generator=g)[:n_queries]
    pairs = make_warp_pairs(test[0][qi], warp, n_points=n_points, seed=seed)
    return EvalSet(seed, train[0][bi], train[1][bi], pairs, test[1][qi])


@torch.no_grad()
def score_method(method: Method, data: EvalSet, taps: list[str], batch: int) -> Scores:
    """kNN and warp PCK of every tap for one method on one seed's data.

    Bank and queries go through the same extractor; noise draws come from a generator seeded by the
    data's seed, so a noisy method is reproducible. Only the query (source) extraction is timed.
    """
    return score_method_splits(method, data, {"test": (data.pairs, data.query_labels)}, taps, batch)["test"]


@torch.no_grad()
def score_method_splits(method: Method, data: EvalSet, splits: dict[str, tuple[WarpPairs, torch.Tensor]],
                        taps: list[str], batch: int) -> dict[str, Scores]:
    """:func:`score_method` on several query sets (e.g. validation and test) against one bank extraction.

    Splits are scored in the given order after the bank, from one generator: the first split's numbers
    are those :func:`score_method` gives for it.
    """
    g = torch.Generator().manual_seed(10_000 + data.seed)
    pooled_bank = _pooled(method.extract, data.bank, g, batch)
    return {name: _score_queries(method, pooled_bank, data.bank_labels, pairs, labels, g, taps, batch)
            for name, (pairs, labels) in splits.items()}


def _score_queries(method: Method, pooled_bank: dict[str, torch.Tensor], bank_labels: torch.Tensor,
                   pairs: WarpPairs, query_labels: torch.Tensor, g: torch.Generator, taps: list[str],
                   batch: int) -> Scores:
    pooled_q: dict[str, list[torch.Tensor]] = {t: [] for t in taps}
    preds: dict[str, list[torch.Tensor]] = {t: [] for t in taps}
    seconds = 0.0
    for start in range(0, len(pairs.source), batch):
        sl = slice(start, start + batch)
        t0 = time.perf_counter()
        src = method.extract(pairs.source[sl], g)
        seconds += time.perf_counter() - t0
        trg = method.extract(pairs.target[sl], g)
        for tap in taps:
            pooled_q[tap].append(src[tap].mean(dim=(2, 3)))
            preds[tap].append(predict_matches(src[tap], trg[tap], pairs.src_xy[sl], pairs.image_size))
    out = Scores(seconds_per_image=seconds / len(pairs.source))
    for tap in taps:
        out.knn[tap] = knn_top1(pooled_bank[tap], bank_labels, torch.cat(pooled_q[tap]), query_labels)
        pck = warp_pck(torch.cat(preds[tap]), pairs)
        out.pck10[tap], out.pck05[tap] = pck["pck@0.10"], pck["pck@0.05"]
    return out


@torch.no_grad()
def time_methods(methods: dict[str, Method], images: torch.Tensor, repeats: int = 5, warmup: int = 1,
                 seed: int = 0) -> dict[str, float]:
    """Median seconds per image of each method on ``images``: ``warmup`` untimed calls each, then
    ``repeats`` timed rounds that call every method once in turn.

    The first call of a network pays one-off costs (allocations, kernel selection) that a one-shot
    timing charges to whichever method runs first; taking turns spreads any change in the machine's
    load over all methods instead of penalising the one that happened to run during it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    g = torch.Generator().manual_seed(seed)
    for method in methods.values():
        for _ in range(warmup):
            method.extract(images, g)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            t0 = time.perf_counter()
            method.extract(images, g)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) / len(images) for name, t in times.items()}


def pick_best(val: dict[str, float], test: dict[str, float]) -> tuple[str, float]:
    """The key with the best validation score and its *test* score (ties: the first key)."""
    key = max(val, key=val.get)
    return key, test[key]


def _pooled(extract: FeatureFn, images: torch.Tensor, g: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch):
        for tap, f in extract(images[start:start + batch], g).items():
            chunks.setdefault(tap, []).append(f.mean(dim=(2, 3)))
    return {tap: torch.cat(v) for tap, v in chunks.items()}


