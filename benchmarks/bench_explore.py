"""``cleandift explore`` latency on a CPU with the bundled mini model: feature time vs click-to-answer time.

    python benchmarks/bench_explore.py                      # sizes 32,128; images 256,1024 px; 50 clicks

* **features** -- computing one image's feature map (tap us6) per method, cache cleared: what the first
  click on a new image (or new settings) costs. Median over ``--feature-repeats`` rounds of every image.
* **click** -- one ``/api/match`` question once the features exist: one source point matched on every
  target (4 targets) with every method (CleanDIFT, DIFT, frozen), plus the heatmaps. Median over
  ``--clicks`` clicks at random points; reported per click and per click per (target, method). The
  ``http`` row goes through the FastAPI app (``TestClient``: validation, JSON of the heatmaps) too.

``--size`` is the model input (32 = the mini model's own; 128 gives a 64x64 us6 map, the size class of
SD at 512 px) and ``--image-px`` the side of the served images (the matcher's pixel grid is the original
image up to ``Limits.max_match_side`` = 512 px, a reduced frame beyond). Results are appended to
``benchmarks/results/explore.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _timing import append_report, environment_line  # noqa: E402

from cleandift.explore.cache import FeatureCache  # noqa: E402
from cleandift.explore.session import Explorer, open_session  # noqa: E402
from cleandift.explore.store import ImageStore  # noqa: E402

MATCHERS = {"argmax, pixels": ("argmax", "pixels"), "soft-argmax, pixels": ("soft-argmax", "pixels"),
            "argmax, cells": ("argmax", "cells")}


def session_at(base: Explorer, size: int, image_px: int, folder: Path) -> Explorer:
    """The same model and student, at input ``size``, serving the sample images resized to ``image_px``."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in base.images.list():
        image = base.images.image(entry["id"]).resize((image_px, image_px), Image.NEAREST)
        image.save(folder / entry["name"])
    store = ImageStore(base.limits, min_side=base.backbone.latent_factor)
    store.add_paths([folder])
    return Explorer(base.backbone, store, student=base.student, student_timestep=base.student_timestep,
                    size=size, limits=base.limits, model_name=base.model_name)


def feature_times(ex: Explorer, methods, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {s.method: [] for s in methods}
    ids = [im["id"] for im in ex.images.list()]
    for s in methods:  # warm-up: first calls allocate
        ex.features(ids[0], s)
    for _ in range(repeats):
        for s in methods:
            for image_id in ids:
                ex.cache = FeatureCache(ex.limits.cache_bytes)
                t0 = time.perf_counter()
                ex.features(image_id, s)
                times[s.method].append(time.perf_counter() - t0)
    return times


def click_times(ask, clicks: int, warmup: int = 3) -> list[float]:
    rng = random.Random(0)
    points = [[rng.uniform(0, 255), rng.uniform(0, 255)] for _ in range(clicks + warmup)]
    out = []
    for i, point in enumerate(points):
        t0 = time.perf_counter()
        ask(point)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def bench(base: Explorer, size: int, image_px: int, clicks: int, feature_repeats: int, tmp: Path
          ) -> list[str]:
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from cleandift.explore.server import create_app  # noqa: PLC0415

    ex = session_at(base, size, image_px, tmp / f"{image_px}")
    methods = [ex.settings("cleandift"), ex.settings("dift"), ex.settings("frozen")]
    rows = []
    feats = feature_times(ex, methods, feature_repeats)
    for s in methods:
        label = {"cleandift": "CleanDIFT", "dift": "DIFT, 8 draws", "frozen": "frozen, clean"}[s.method]
        med = statistics.median(feats[s.method])
        rows.append(f"| {size} | {image_px} | features: {label} | {med * 1000:.1f} | per image | "
                    f"{len(feats[s.method])} |")
    ids = [im["id"] for im in ex.images.list()]
    source, targets = ids[0], ids[1:5]
    ex.match(source, [[10.0, 10.0]], targets, methods)  # every feature map now exists
    scale = image_px / 256
    pairs = len(targets) * len(methods)
    for name, (method, grid) in MATCHERS.items():
        matcher = ex.matcher(method, grid)
        def click(p, matcher=matcher):
            ex.match(source, [[p[0] * scale, p[1] * scale]], targets, methods, matcher)

        t = click_times(click, clicks)
        med = statistics.median(t)
        rows.append(f"| {size} | {image_px} | click: {name} | {med * 1000:.1f} | {med / pairs * 1000:.1f} "
                    f"per (target, method) | {len(t)} |")
    with TestClient(create_app(ex)) as client:
        payload = {"source": source, "targets": targets,
                   "methods": [{"name": "cleandift"}, {"name": "dift"}, {"name": "frozen"}]}

        def http(p):
            r = client.post("/api/match", json={**payload, "points": [[p[0] * scale, p[1] * scale]]})
            assert r.status_code == 200 and r.json()["timing"]["features_ms"] == 0, r.text

        t = click_times(http, clicks)
    med = statistics.median(t)
    rows.append(f"| {size} | {image_px} | click via HTTP: argmax, pixels | {med * 1000:.1f} | "
                f"{med / pairs * 1000:.1f} per (target, method) | {len(t)} |")
    ex.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,128", help="model input sizes (multiples of 8)")
    parser.add_argument("--image-px", default="256,1024", help="sides of the served images")
    parser.add_argument("--clicks", type=int, default=50)
    parser.add_argument("--feature-repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = open_session("mini")
    lines = [f"## explore — bundled mini model, tap us6, CPU, {date.today()}", "",
             f"{environment_line()}; {len(base.images)} sample images, 1 source x 4 targets x 3 methods per "
             "click (CleanDIFT, DIFT with 8 draws, frozen), heatmaps included; medians.", "",
             "| model size | image px | case | median ms | | n |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            for image_px in (int(p) for p in args.image_px.split(",")):
                lines += bench(base, size, image_px, args.clicks, args.feature_repeats, Path(tmp) / str(size))
                print("\n".join(lines), flush=True)
    base.close()
    text = "\n".join(lines) + "\n"
    append_report(text, args.out or Path(__file__).parent / "results" / "explore.md")


if __name__ == "__main__":
    main()
