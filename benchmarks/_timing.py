"""Shared timing helpers for the benchmark scripts: interleaved repeats, medians, peak RSS."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (VmHWM) of this process, where supported (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def interleaved(cases: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then ``repeats`` rounds of all cases one after another.

    Interleaving puts each case under the same machine conditions, so ratios between cases are
    far more stable than absolute times on a noisy machine.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), min(times)


def environment_line() -> str:
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def append_report(text: str, out: str | Path) -> Path:
    """Append a run's report to a results file (results accumulate: every measured run stays on record)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(text + "\n")
    print(f"appended to {out}")
    return out
