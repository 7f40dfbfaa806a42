"""Result plots: PCK-vs-timestep curves and a generic bar / line chart.

The curve plot is the paper's Fig. 6 shape: every noisy method is a curve over the timestep ``t``;
methods without a timestep (CleanDIFT, which needs no ``t``) are horizontal lines across the whole
range, so "no t to tune" is visible at a glance. Figures use the Agg canvas at a fixed size / dpi.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

LINESTYLES = ("--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)))
#: More x labels than this would overlap at the default size; only every n-th is written then.
MAX_TICK_LABELS = 20


def _figure(figsize: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", metadata={"Software": "cleandift"})
    return path


def _label_axes(ax, xlabel: str | None, ylabel: str | None, title: str | None) -> None:
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)


def plot_pck_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
                    constants: Mapping[str, float] | None = None, xlabel: str = "timestep t",
                    ylabel: str = "PCK@0.1", title: str | None = None, ylim: tuple[float, float] | None = None,
                    figsize: tuple[float, float] = (8.0, 5.0), dpi: int = 100) -> Path:
    """PCK against ``t`` for several methods, plus horizontal lines for ``t``-independent ones.

    Args:
        curves: ``{method: (ts, pcks)}``; points are sorted by ``t`` before drawing.
        constants: ``{method: pck}`` drawn as dashed horizontal lines (e.g. CleanDIFT).
        ylim: fixed y range (default: matplotlib's autoscale).
    Returns:
        the written path (a PNG of exactly ``figsize * dpi`` pixels).
    """
    if not curves and not constants:
        raise ValueError("nothing to plot: give at least one curve or constant")
    fig, ax = _figure(figsize, dpi)
    for name, (ts, values) in curves.items():
        ts_arr, val_arr = np.asarray(ts, dtype=float), np.asarray(values, dtype=float)
        if ts_arr.shape != val_arr.shape:
            raise ValueError(f"curve {name!r}: {ts_arr.size} timesteps but {val_arr.size} values")
        order = np.argsort(ts_arr, kind="stable")
        ax.plot(ts_arr[order], val_arr[order], marker="o", markersize=3.5, linewidth=1.5, label=name)
    for i, (name, value) in enumerate((constants or {}).items()):
        colour = f"C{(len(curves) + i) % 10}"
        ax.axhline(float(value), color=colour, linestyle=LINESTYLES[i % len(LINESTYLES)], linewidth=1.5,
                   label=f"{name} ({float(value):.2f})")
    if ylim is not None:
        ax.set_ylim(*ylim)
    _label_axes(ax, xlabel, ylabel, title)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path, dpi)


def plot_series(series: Mapping[str, Sequence[float]], path: str | Path, *, labels: Sequence[str] | None = None,
                kind: Literal["bar", "line"] = "bar", xlabel: str | None = None, ylabel: str | None = None,
                title: str | None = None, ylim: tuple[float, float] | None = None, annotate: bool = False,
                figsize: tuple[float, float] = (8.0, 5.0), dpi: int = 100) -> Path:
    """Several named series over shared categories, as grouped bars or lines.

    Args:
        series: ``{name: values}``, all of one length ``K``.
        labels: the ``K`` category labels on the x axis (default ``0..K-1``).
        kind: ``bar`` (grouped bars) or ``line``.
        annotate: write each bar's value above it (bars only).
    Returns:
        the written path.
    """
    if kind not in ("bar", "line"):
        raise ValueError(f"kind must be 'bar' or 'line', got {kind!r}")
    if not series:
        raise ValueError("nothing to plot: series is empty")
    lengths = {len(v) for v in series.values()}
    if len(lengths) != 1:
        raise ValueError(f"all series must have the same length, got {sorted(lengths)}")
    k = lengths.pop()
    labels = list(labels) if labels is not None else [str(i) for i in range(k)]
    if len(labels) != k:
        raise ValueError(f"{len(labels)} labels for {k} values per series")
    fig, ax = _figure(figsize, dpi)
    x = np.arange(k, dtype=float)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        vals = np.asarray(values, dtype=float)
        if kind == "bar":
            bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width=width, label=name)
            if annotate:
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
        else:
            ax.plot(x, vals, marker="o", markersize=3.5, linewidth=1.5, label=name)
    every = max(1, -(-k // MAX_TICK_LABELS))  # many categories (e.g. training steps): label every n-th only
    long = max((len(s) for s in labels), default=0) > 6
    ax.set_xticks(x[::every])
    ax.set_xticklabels(labels[::every], rotation=45 if long else 0, ha="right" if long else "center", fontsize=8)
    if ylim is not None:
        ax.set_ylim(*ylim)
    _label_axes(ax, xlabel, ylabel, title)
    if len(series) > 1 or kind == "line":
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path, dpi)
