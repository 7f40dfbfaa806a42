"""kNN readouts on the mini model: how much of the feature-vs-pixel kNN gap is the readout?

The kNN protocol pools each tap *globally* (average), which throws away the object's layout, while
the raw-pixel baseline keeps all of it. This script scores every tap under every readout of
:mod:`cleandift.eval.pooling` (global: avg, max, avg+max, avg+std; coarse layout: grid2, grid4) plus
the concatenation of all taps, for raw pixels, the frozen model on the clean image (t = 0), the
shipped CleanDIFT student, and any ``--extra NAME=FOLDER`` pixel backbone (read at t = 0).

Selection is not done on the test set: per seed the bank is 10,000 random images of the first
50,000 training images and the queries are 2,000 random test images; a fixed validation set of
2,000 of the last 10,000 training images (never in a bank) picks each method's (tap, readout).
Test accuracies are mean +- standard error over the seeds (k = 10 cosine majority vote, null prompt).

    python benchmarks/mini_knn_readouts.py                    # ~10 min on 2 cores
    python benchmarks/mini_knn_readouts.py --extra p05=/work/runs/ft-export --student none
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment_line  # noqa: E402
from mini_comparison import load_models  # noqa: E402

from cleandift.backbones.pixel import load_pixel_backbone  # noqa: E402
from cleandift.eval.pooling import GLOBAL_READOUTS, READOUTS, pool_map  # noqa: E402
from cleandift.extract import CleanExtractor  # noqa: E402
from cleandift.pretrain.idx import load_idx_dataset, to_model_range  # noqa: E402
from cleandift.pretrain.probe import knn_top1  # noqa: E402

ALL_TAPS = "all"  # pseudo-tap: every tap's readout, each L2-normalised, concatenated
PIXEL_READOUTS = ("pixels[0,1]", "pixels[-1,1]", "grid4")
BANK_POOL = 50_000  # banks come from the first 50,000 training images, validation from the rest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini", help="pixel backbone: 'mini' (bundled) or an exported folder")
    p.add_argument("--student", default="bundled", help="student export folder / file, 'bundled' or 'none'")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FOLDER",
                   help="another exported pixel backbone to score at t = 0 (repeatable)")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--bank", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=2_000)
    p.add_argument("--val", type=int, default=2_000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mini_knn_readouts"))
    p.add_argument("--render", action="store_true",
                   help="only rewrite OUT.md from the scores recorded in OUT.json (no extraction)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data
def draw_splits(n_train: int, n_test: int, seeds: list[int], bank: int, queries: int, val: int
                ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per seed (bank indices into train, query indices into test); one fixed validation index set."""
    if n_train <= BANK_POOL:
        raise ValueError(f"need more than {BANK_POOL} training images for a disjoint validation set, got {n_train}")
    g = torch.Generator().manual_seed(1234)
    val_idx = BANK_POOL + torch.randperm(n_train - BANK_POOL, generator=g)[:val]
    splits = {}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        splits[seed] = (torch.randperm(BANK_POOL, generator=g)[:bank], torch.randperm(n_test, generator=g)[:queries])
    return splits, val_idx


@torch.no_grad()
def readouts_of(extract, images: torch.Tensor, taps: list[str], batch: int) -> dict[tuple[str, str], torch.Tensor]:
    """``{(tap, readout): (N, D) float16}`` for every tap and readout, plus the all-tap concatenations."""
    chunks: dict[tuple[str, str], list[torch.Tensor]] = {}
    for start in range(0, len(images), batch):
        feats = extract(images[start:start + batch])
        for readout in READOUTS:
            parts = []
            for tap in taps:
                v = pool_map(feats[tap], readout)
                chunks.setdefault((tap, readout), []).append(v.half())
                parts.append(F.normalize(v, dim=1))
            chunks.setdefault((ALL_TAPS, readout), []).append(torch.cat(parts, dim=1).half())
    return {key: torch.cat(v) for key, v in chunks.items()}


def pixel_readouts(images: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """The raw-pixel baselines (both intensity ranges, as in the comparison) and pixels on a 4x4 grid."""
    flat = images.flatten(1).float()
    return {("pixels", "pixels[0,1]"): (flat + 1) / 2, ("pixels", "pixels[-1,1]"): flat,
            ("pixels", "grid4"): pool_map((images.float() + 1) / 2, "grid4")}


# ---------------------------------------------------------------------------------------------- scoring
def score_all(vectors: dict[tuple[str, str], torch.Tensor], index_of: dict[int, int], labels: tuple,
              splits: dict, val_idx: torch.Tensor) -> dict[str, dict]:
    """``{"tap|readout": {"val": [acc per seed], "test": [acc per seed]}}`` in percent."""
    train_y, test_y = labels
    rows = {}
    for (tap, readout), v in vectors.items():
        row = {"val": [], "test": []}
        for seed, (bank, queries) in splits.items():
            bank_x = v[[index_of[("train", int(i))] for i in bank]]
            val_x = v[[index_of[("train", int(i))] for i in val_idx]]
            test_x = v[[index_of[("test", int(i))] for i in queries]]
            row["val"].append(100 * knn_top1(bank_x, train_y[bank], val_x, train_y[val_idx]))
            row["test"].append(100 * knn_top1(bank_x, train_y[bank], test_x, test_y[queries]))
        rows[f"{tap}|{readout}"] = row
    return rows


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return m, se


def pick(rows: dict[str, dict], readouts: tuple[str, ...], single_tap: bool = False) -> str:
    """The ``tap|readout`` key with the best mean validation accuracy among ``readouts`` (and one tap)."""
    keys = [k for k in rows if k.split("|")[1] in readouts and not (single_tap and k.startswith(ALL_TAPS + "|"))]
    return max(keys, key=lambda k: statistics.fmean(rows[k]["val"]))


# ---------------------------------------------------------------------------------------------- report
def summary_markdown(results: dict[str, dict[str, dict]]) -> str:
    pixels = results["raw pixels"]
    base_key = pick(pixels, ("pixels[0,1]", "pixels[-1,1]"))
    base = pixels[base_key]["test"]

    def cell(rows, key):
        m, se = mean_se(rows[key]["test"])
        dm, dse = mean_se([a - b for a, b in zip(rows[key]["test"], base)])
        return f"{m:.1f} ± {se:.1f} ({key.replace('|', ', ')}; {dm:+.1f} ± {dse:.1f})"

    lines = [f"Test kNN top-1 %, mean ± SE over seeds; in brackets the (tap, readout) picked on the validation set "
             f"and the margin over the raw-pixel baseline ({base_key.split('|')[1]}, "
             f"{statistics.fmean(base):.1f}), mean ± SE of the per-seed differences.", "",
             "| features | protocol: global avg, one tap | global avg, all taps | best global readout "
             "| best readout incl. 2x2 / 4x4 grids |",
             "|---|---|---|---|---|"]
    for name, rows in results.items():
        if name == "raw pixels":
            lines.append(f"| raw pixels | {cell(rows, base_key)} | – | – | {cell(rows, 'pixels|grid4')} (16-dim) |")
            continue
        lines.append(f"| {name} | {cell(rows, pick(rows, ('avg',), single_tap=True))} "
                     f"| {cell(rows, f'{ALL_TAPS}|avg')} | {cell(rows, pick(rows, GLOBAL_READOUTS))} "
                     f"| {cell(rows, pick(rows, READOUTS))} |")
    return "\n".join(lines)


def grid_markdown(name: str, rows: dict[str, dict]) -> str:
    taps = list(dict.fromkeys(k.split("|")[0] for k in rows))
    lines = [f"**{name}**: test kNN top-1 % (mean over seeds) per tap and readout", "",
             "| tap | " + " | ".join(READOUTS) + " |", "|---|" + "---|" * len(READOUTS)]
    for tap in taps:
        cells = [f"{statistics.fmean(rows[f'{tap}|{r}']['test']):.1f}" for r in READOUTS]
        lines.append(f"| {tap} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, command: str, settings: str, results: dict[str, dict[str, dict]]) -> str:
    text = "\n\n".join([f"# kNN readouts on the mini model ({date.today().isoformat()})",
                        f"`python benchmarks/mini_knn_readouts.py {command}` -- {settings}", summary_markdown(results)]
                       + [grid_markdown(n, r) for n, r in results.items() if n != "raw pixels"])
    out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.render:
        recorded = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        print(write_report(out, recorded["command"], recorded["settings"], recorded["results"]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    backbone, student, student_t = load_models(args.model, args.student)
    train_x, train_y = load_idx_dataset(args.data, "train")
    test_x, test_y = load_idx_dataset(args.data, "test")
    splits, val_idx = draw_splits(len(train_x), len(test_x), seeds, args.bank, args.queries, args.val)
    need_train = sorted(set(val_idx.tolist()).union(*(set(b.tolist()) for b, _ in splits.values())))
    need_test = sorted(set().union(*(set(q.tolist()) for _, q in splits.values())))
    images = torch.cat([to_model_range(train_x[need_train], backbone.resolution),
                        to_model_range(test_x[need_test], backbone.resolution)])
    index_of = {("train", i): k for k, i in enumerate(need_train)}
    index_of.update({("test", i): len(need_train) + k for k, i in enumerate(need_test)})
    labels = (train_y.long(), test_y.long())
    taps = list(backbone.taps.names)

    extractors = {"clean t=0 (frozen)": CleanExtractor(backbone, timestep=0, taps=taps, chunk_size=args.batch)}
    if student is not None:
        extractors[f"CleanDIFT (shipped, t={student_t:g})"] = CleanExtractor(
            backbone, unet=student, timestep=student_t, taps=taps, chunk_size=args.batch)
    for spec in args.extra:
        name, _, folder = spec.partition("=")
        extra = load_pixel_backbone(folder)
        extractors[f"{name} clean t=0"] = CleanExtractor(extra, timestep=0, taps=taps, chunk_size=args.batch)

    print(f"{len(images)} images ({len(need_train)} train, {len(need_test)} test), taps {','.join(taps)}", flush=True)
    results = {"raw pixels": score_all(pixel_readouts(images), index_of, labels, splits, val_idx)}
    seconds = {}
    for name, ex in extractors.items():
        t0 = time.perf_counter()
        vectors = readouts_of(lambda x, ex=ex: ex(x, taps=taps), images, taps, args.batch)
        results[name] = score_all(vectors, index_of, labels, splits, val_idx)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
        del vectors

    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    settings = (f"bank {args.bank}, queries {args.queries}, validation {args.val}, seeds {args.seeds}; "
                f"{environment_line()}; extraction + scoring seconds per model: "
                + ", ".join(f"{n} {s}" for n, s in seconds.items()))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "settings": settings, "args": vars(args),
                                                    "seconds": seconds, "results": results}, indent=1) + "\n",
                                        encoding="utf-8")
    print(write_report(out, command, settings, results))
    print(f"\nwrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
