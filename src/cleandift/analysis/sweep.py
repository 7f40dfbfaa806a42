"""Timestep sweeps: a downstream score of noisy features at every t, against clean features.

For a scorer ``score(extractor) -> float`` (a probe task from :func:`make_task_scorer`, or any
callable) the sweep evaluates

* ``noisy`` -- DIFT features ``NoisyExtractor(backbone, t, ensemble)`` at each ``t``;
* ``clean`` -- the CleanDIFT student on the clean input (one number, drawn as a horizontal line);
* ``naive-clean`` -- the *frozen* model fed the clean input but told timestep ``t``
  (``CleanExtractor(backbone, unet=backbone.unet, timestep=t)``), the baseline the paper shows
  degrades (Fig. 6): it isolates "no noise" from "trained for no noise".

The result is a table (JSON / CSV) and a PNG of score vs t.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from tqdm import tqdm

from ..extract import CleanExtractor, NoisyExtractor
from ..timesteps import DIFT_TIMESTEP

logger = logging.getLogger(__name__)

Task = Literal["depth", "seg", "knn"]
TASK_METRICS: dict[str, tuple[str, bool]] = {"depth": ("rmse", False), "seg": ("miou", True), "knn": ("top1", True)}


@dataclass
class TaskScorer:
    """A ``score(extractor) -> float`` with the name and direction of its metric (used for plots and 'best')."""

    fn: Callable[[object], float]
    metric: str = "score"
    higher_is_better: bool = True
    details: list[dict] = field(default_factory=list)

    def __call__(self, extractor) -> float:
        return float(self.fn(extractor))


def make_task_scorer(task: Task, root: str | Path, *, train_split: str = "train", eval_split: str | None = None,
                     spec=None, train=None, task_config=None, cache_dir: str | Path | None = None, device=None,
                     progress: bool = True) -> TaskScorer:
    """A scorer that trains/evaluates the ``task`` probe on ``root`` for a given extractor.

    ``depth`` returns RMSE (lower is better), ``seg`` mIoU, ``knn`` top-1. The datasets are opened
    once; every call re-extracts features for its extractor (or reads them from ``cache_dir``).
    Full metric dicts of every call are appended to ``scorer.details``.
    """
    from ..eval import probe_common  # noqa: PLC0415

    spec = spec or probe_common.FeatureSpec()
    train = train or probe_common.ProbeTrainConfig()
    metric, higher = TASK_METRICS[task] if task in TASK_METRICS else (None, None)
    if metric is None:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_METRICS)}")
    details: list[dict] = []
    if task == "depth":
        from ..eval import depth  # noqa: PLC0415

        train_set = depth.open_depth_dataset(root, train_split)
        eval_set = depth.open_depth_dataset(root, eval_split or "test")

        def run(extractor):
            return depth.run_depth_probe(extractor, train_set, eval_set, spec, train, task_config, cache_dir, device,
                                         progress)
    elif task == "seg":
        from ..eval import segmentation  # noqa: PLC0415

        train_set = segmentation.VOCSegmentation(root, train_split)
        eval_set = segmentation.VOCSegmentation(root, eval_split or "val")

        def run(extractor):
            return segmentation.run_segmentation_probe(extractor, train_set, eval_set, spec, train, task_config,
                                                       cache_dir, device, progress)
    else:
        from ..eval import knn  # noqa: PLC0415

        train_set = knn.ImageFolderDataset(root, train_split)
        eval_set = knn.ImageFolderDataset(root, eval_split or "val", classes=train_set.classes)

        def run(extractor):
            return knn.run_knn(extractor, train_set, eval_set, spec, task_config, cache_dir, progress)

    def score(extractor) -> float:
        result = run(extractor)
        details.append(result.metrics)
        return float(result.metrics[metric])

    return TaskScorer(score, metric, higher, details)


@dataclass
class SweepRow:
    method: str  # "noisy" | "clean" | "naive-clean"
    t: int | None
    ensemble: int | None
    score: float


@dataclass
class SweepResult:
    """The sweep table plus how to read it."""

    metric: str
    higher_is_better: bool
    rows: list[SweepRow] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def by_method(self, method: str) -> list[SweepRow]:
        return sorted((r for r in self.rows if r.method == method), key=lambda r: -1 if r.t is None else r.t)

    def best(self, method: str = "noisy") -> SweepRow | None:
        rows = [r for r in self.by_method(method) if not math.isnan(r.score)]
        if not rows:
            return None
        return (max if self.higher_is_better else min)(rows, key=lambda r: r.score)

    def to_dict(self) -> dict:
        best = self.best("noisy")
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "config": self.config,
                "rows": [vars(r) for r in self.rows], "best_noisy": vars(best) if best else None}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    def save_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "t", "ensemble", self.metric])
            for r in self.rows:
                writer.writerow([r.method, "" if r.t is None else r.t, "" if r.ensemble is None else r.ensemble,
                                 r.score])
        return path

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Score vs t: noisy (and naive-clean) as lines, clean as a horizontal line (PNG)."""
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(6, 4))
        noisy = self.by_method("noisy")
        if noisy:
            ens = noisy[0].ensemble
            ax.plot([r.t for r in noisy], [r.score for r in noisy], "o-", color="#d62728",
                    label=f"noisy (ensemble {ens})")
        naive = self.by_method("naive-clean")
        if naive:
            ax.plot([r.t for r in naive], [r.score for r in naive], "s--", color="#7f7f7f",
                    label="naive clean (frozen model, clean input)")
        for r in self.by_method("clean"):
            ax.axhline(r.score, color="#1f77b4", lw=2, label="clean (CleanDIFT)")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(f"{self.metric} ({'higher' if self.higher_is_better else 'lower'} is better)")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def timestep_sweep(score: Callable[[object], float], backbone, ts: Sequence[int], *, student=None,
                   student_timestep: float = DIFT_TIMESTEP, ensemble: int = 1, naive_clean: bool = True,
                   taps: str | Sequence[str] | None = None, chunk_size: int = 8, noise: str = "independent",
                   sample_posterior: bool = True, metric: str | None = None, higher_is_better: bool | None = None,
                   progress: bool = True) -> SweepResult:
    """Evaluate ``score`` on noisy features at every ``t``, on the student (if given), and on naive clean features.

    Args:
        score: ``score(extractor) -> float`` (a :class:`TaskScorer` also supplies metric name/direction).
        backbone: the frozen diffusion backbone.
        ts: timesteps in ``[0, T-1]``.
        student: the fine-tuned U-Net; ``None`` leaves out the ``clean`` row.
        student_timestep: the timestep input of the student (261, or the checkpoint's learned value).
        ensemble: noise draws averaged per noisy feature (1 = single draw, DIFT uses 8).
        naive_clean: also run the frozen model on clean inputs at every ``t``.
        taps: default taps of the extractors (the scorer may ask for its own).
        sample_posterior: whether noisy extraction samples the VAE posterior (DIFT does).
    """
    ts = [int(t) for t in ts]
    metric = metric or getattr(score, "metric", "score")
    higher = higher_is_better if higher_is_better is not None else getattr(score, "higher_is_better", True)
    jobs: list[tuple[str, int | None, int | None, Callable[[], object]]] = []
    for t in ts:
        jobs.append(("noisy", t, ensemble, lambda t=t: NoisyExtractor(
            backbone, t=t, ensemble=ensemble, noise=noise, taps=taps, chunk_size=chunk_size,
            sample_posterior=sample_posterior)))
    if student is not None:
        jobs.append(("clean", None, None, lambda: CleanExtractor(backbone, unet=student, timestep=student_timestep,
                                                                  taps=taps, chunk_size=chunk_size)))
    if naive_clean:
        for t in ts:
            jobs.append(("naive-clean", t, None, lambda t=t: CleanExtractor(backbone, unet=backbone.unet, timestep=t,
                                                                            taps=taps, chunk_size=chunk_size)))
    rows: list[SweepRow] = []
    for method, t, ens, build in tqdm(jobs, desc="sweep", unit="run", disable=not progress):
        value = float(score(build()))
        logger.info("%s t=%s: %s = %.4f", method, t, metric, value)
        rows.append(SweepRow(method, t, ens, value))
    config = {"ts": ts, "ensemble": ensemble, "student_timestep": student_timestep if student is not None else None,
              "naive_clean": naive_clean, "noise": noise, "sample_posterior": sample_posterior}
    return SweepResult(metric, bool(higher), rows, config)
