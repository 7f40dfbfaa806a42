"""Does one clean pass beat noisy features? The measured comparison on the offline ``mini`` model.

    python benchmarks/mini_comparison.py --model mini --student bundled            # shipped weights
    python benchmarks/mini_comparison.py --model RUN/export --student RUN/distill/export --quick

On held-out Fashion-MNIST test images, for every feature method below and every tap:

* **kNN top-1** -- k = 10, cosine, globally average-pooled features, bank = ``--bank`` training images,
  null prompt; raw pixels as the baseline (both [0, 1] and [-1, 1] scalings);
* **warp PCK@0.1 / @0.05** -- each query image against a strong random warp of itself
  (:mod:`cleandift.eval.warp`: rotation up to +-45 deg, scale 0.7-1.3, translation, perspective, elastic;
  ground truth by construction; points on the object), DIFT matching (bilinear source descriptor,
  upsampled target map, cosine argmax), threshold alpha * 32 px; "nothing moves" as the baseline;
* **cost** -- U-Net passes per image and measured seconds per image (query extraction, this machine).

Methods: noisy single draw at each t of ``--ts`` (DIFT's feature at that t); noisy ensemble of
``--ensemble`` draws at the best t of the sweep (best per metric) and at DIFT's t = 261; "naive clean" (the frozen model on the
clean image with timestep input ``--naive-t``); clean at t = 0 (frozen model, clean image, t = 0); and
CleanDIFT (the student on the clean image at its learned timestep). Every seed draws its own bank and
query subsets, warps and noise; tables give mean +- standard error over seeds. The noise-variance
analysis (paper Sec. 3.1) runs on ``--variance-images`` test images. Results go to ``--out``
(``results.json``, ``summary.md``, PNG figures). The full protocol takes CPU-hours: each finished
(seed, method) is appended to ``OUT/scores.jsonl`` at once, and ``--resume`` picks a killed run up there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment_line  # noqa: E402

from cleandift.backbones.loading import load_backbone  # noqa: E402
from cleandift.checkpoints import load_student, read_checkpoint  # noqa: E402
from cleandift.eval.method_comparison import (  # noqa: E402
    Method, ScoreCache, Scores, ensemble_method, make_eval_set, make_methods, score_method,
)
from cleandift.eval.warp import WarpConfig, nothing_moves  # noqa: E402
from cleandift.pretrain.idx import load_idx_dataset, to_model_range  # noqa: E402
from cleandift.pretrain.probe import pixel_baselines  # noqa: E402

# ---------------------------------------------------------------------------------------------- summary
def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return m, se


def best_tap(per_seed: list[Scores], metric: str) -> str:
    taps = list(getattr(per_seed[0], metric))
    return max(taps, key=lambda tap: statistics.fmean(getattr(s, metric)[tap] for s in per_seed))


def fmt(values: list[float], scale: float = 100.0) -> str:
    m, se = mean_se(values)
    return f"{scale * m:.1f} ± {scale * se:.1f}" if not math.isnan(se) else f"{scale * m:.1f}"


def summary_table(methods: dict[str, Method], scores: dict[str, list[Scores]]) -> list[str]:
    lines = ["| method | U-Net passes | ms / image (median over seeds) | kNN top-1 (best tap) | PCK@0.1 (best tap) "
             "| PCK@0.05 (best tap) |", "|---|---|---|---|---|---|"]
    for name, per_seed in scores.items():
        cells = []
        for metric in ("knn", "pck10", "pck05"):
            tap = best_tap(per_seed, metric)
            cells.append(f"{fmt([getattr(s, metric)[tap] for s in per_seed])} ({tap})")
        secs = statistics.median(s.seconds_per_image for s in per_seed)
        lines.append(f"| {name} | {methods[name].passes} | {secs * 1000:.2f} | " + " | ".join(cells) + " |")
    return lines


def per_tap_table(scores: dict[str, list[Scores]], metric: str, taps: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(taps) + " |", "|---" * (len(taps) + 1) + "|"]
    for name, per_seed in scores.items():
        lines.append(f"| {name} | " + " | ".join(fmt([getattr(s, metric)[t] for s in per_seed]) for t in taps) + " |")
    return lines


def plot_sweep(scores: dict[str, list[Scores]], methods: dict[str, Method], metric: str, ylabel: str,
               path: Path) -> Path:
    """Metric at the best tap vs t for the noisy sweep, horizontal lines for the clean methods."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    sweep = [(m.t, n) for n, m in methods.items() if m.family == "noisy" and n in scores]
    sweep.sort()
    tap = best_tap([s for _, n in sweep for s in scores[n]], metric) if sweep else None
    if sweep:
        xs = [t for t, _ in sweep]
        stats = [mean_se([getattr(s, metric)[tap] for s in scores[n]]) for _, n in sweep]
        ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * (0 if math.isnan(e) else e) for _, e in stats],
                    marker="o", label=f"noisy, 1 draw ({tap})")
    styles = {"ensemble": "C1", "naive-clean": "C2", "clean-t0": "C3", "cleandift": "C4"}
    for name, per_seed in scores.items():
        fam = methods[name].family
        if fam in styles:
            m, _ = mean_se([getattr(s, metric)[tap or best_tap(per_seed, metric)] for s in per_seed])
            ax.axhline(100 * m, color=styles[fam], linestyle="--", label=name)
    ax.set_xlabel("timestep t")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main
def load_models(model: str, student_path: str | None):
    backbone = load_backbone(model, dtype=torch.float32)
    if student_path in (None, "none"):
        return backbone, None, None
    if student_path == "bundled":
        from cleandift.backbones.pixel import BUNDLED_MINI_STUDENT_DIR  # noqa: PLC0415

        student_path = str(BUNDLED_MINI_STUDENT_DIR)
    ckpt = read_checkpoint(student_path)
    student, ckpt = load_student(backbone.unet, ckpt)
    student.eval().requires_grad_(False)
    t = float(ckpt.timestep) if ckpt.timestep is not None else 261.0
    return backbone, student, t


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini", help="pixel backbone: 'mini' (bundled) or an exported folder")
    p.add_argument("--student", default="bundled", help="student export folder / file, 'bundled' or 'none'")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--bank", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=2_000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ts", default="0,50,100,200,261,400,600,800", help="noisy sweep (single draw)")
    p.add_argument("--ensemble", type=int, default=8)
    p.add_argument("--ensemble-ts", default="best,261",
                   help="timesteps of the ensemble rows: 'best' = the best t of the sweep per metric, plus "
                        "explicit values (261 = DIFT's default)")
    p.add_argument("--naive-t", type=int, default=261)
    p.add_argument("--taps", default="mid,us1,us2,us3,us4,us5,us6,us7,us8,us9,us10")
    p.add_argument("--families", default="noisy,ensemble,naive-clean,clean-t0,cleandift",
                   help="which method families to run (e.g. 'cleandift' to score another student alone)")
    p.add_argument("--points", type=int, default=16, help="keypoints per warp pair")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--variance-images", type=int, default=256)
    p.add_argument("--variance-ts", default="50,100,200,261,400,600,800,950")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--contiguous", action="store_true",
                   help="keep the U-Nets in contiguous memory (default: channels-last, ~1.2x faster on CPU here)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the (seed, method) scores already in OUT/scores.jsonl from a run with the same "
                        "settings (every finished pair is appended there as it completes)")
    p.add_argument("--quick", action="store_true", help="bank 2000, queries 500, 2 seeds, short sweep")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mini-comparison"))
    args = p.parse_args(argv)
    if args.quick:
        args.bank, args.queries, args.seeds = 2000, 500, "0,1"
        args.ts, args.variance_images, args.variance_ts = "0,100,261,500", 64, "100,261,500,900"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    taps = args.taps.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    ts = [int(t) for t in args.ts.split(",")]
    backbone, student, student_t = load_models(args.model, args.student)
    if not args.contiguous:
        for unet in (backbone.unet, student):
            if unet is not None:
                unet.to(memory_format=torch.channels_last)
    train_x, train_y = load_idx_dataset(args.data, "train")
    test_x, test_y = load_idx_dataset(args.data, "test")
    train = (to_model_range(train_x, backbone.resolution), train_y)
    test = (to_model_range(test_x, backbone.resolution), test_y)
    warp = WarpConfig()

    families = set(args.families.split(","))
    methods = {n: m for n, m in make_methods(backbone, student, student_t, taps, ts, args.naive_t, args.batch).items()
               if m.family in families}
    scores: dict[str, list[Scores]] = {name: [] for name in methods}
    cache = ScoreCache(out / "scores.jsonl", cache_settings(args))
    if not args.resume and len(cache):
        (out / "scores.jsonl").unlink()
        cache = ScoreCache(out / "scores.jsonl", cache_settings(args))
    if len(cache):
        print(f"resuming: {len(cache)} (seed, method) scores reused from {cache.path}", flush=True)
    baselines: dict[str, list[float]] = {}
    datas = []
    t_start = time.perf_counter()

    def scored(method: Method, data) -> Scores:
        """The cached scores of (seed, method), else computed now and cached."""
        hit = cache.get(data.seed, method.name)
        if hit is None:
            hit = score_method(method, data, taps, args.batch)
            cache.put(data.seed, method.name, hit)
        return hit

    for seed in seeds:
        data = make_eval_set(train, test, seed, args.bank, args.queries, args.points, warp)
        datas.append(data)
        base = pixel_baselines((data.bank, data.bank_labels), (data.pairs.source, data.query_labels))
        base.update({f"nothing moves {k}": v for k, v in nothing_moves(data.pairs).items()})
        for k, v in base.items():
            baselines.setdefault(k, []).append(v)
        for name, method in methods.items():
            scores[name].append(scored(method, data))
            print(f"[{time.perf_counter() - t_start:7.0f}s] seed {seed} {name}: kNN best "
                  f"{max(scores[name][-1].knn.values()):.3f}, PCK@0.1 best {max(scores[name][-1].pck10.values()):.3f}",
                  flush=True)
    # ensemble at the best t of the sweep, per metric
    sweep = {n: scores[n] for n, m in methods.items() if m.family == "noisy"}
    best_ts = set() if not sweep else {methods[max(sweep, key=lambda n: statistics.fmean(max(getattr(s, metric).values())
                                                                 for s in sweep[n]))].t
               for metric in ("knn", "pck10")}
    wanted = args.ensemble_ts.split(",")
    best_ts = sorted((best_ts if "best" in wanted else set()) | {int(t) for t in wanted if t != "best"})
    if "ensemble" not in families:
        best_ts = []
    for t in best_ts:
        method = ensemble_method(backbone, t, args.ensemble, taps, args.batch)
        methods[method.name] = method
        scores[method.name] = [scored(method, data) for data in datas]
        print(f"[{time.perf_counter() - t_start:7.0f}s] {method.name} done", flush=True)

    variance = run_variance(backbone, test[0], args, out) if args.variance_images else {}
    write_results(args, out, methods, scores, baselines, taps, best_ts, variance, student_t)


def cache_settings(args) -> dict:
    """Everything that changes a (seed, method) score; a cache written under other settings is not reused."""
    keep = ("model", "student", "data", "bank", "queries", "ts", "ensemble", "naive_t", "taps", "points", "batch")
    settings = {k: getattr(args, k) for k in keep}
    from cleandift.backbones.pixel import BUNDLED_MINI_DIR, BUNDLED_MINI_STUDENT_DIR  # noqa: PLC0415

    named = {"mini": BUNDLED_MINI_DIR, "bundled": BUNDLED_MINI_STUDENT_DIR}
    for key in ("model", "student"):  # a re-exported folder at the same path is a different model
        path = Path(named.get(settings[key], settings[key]))
        if path.exists():
            files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
            settings[key + "_files"] = [(str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size,
                                         p.stat().st_mtime_ns) for p in files]
    return settings


def run_variance(backbone, images: torch.Tensor, args, out: Path) -> dict:
    from cleandift.analysis.variance import noise_variance_analysis  # noqa: PLC0415

    ts = [int(t) for t in args.variance_ts.split(",")]
    imgs = images[: args.variance_images]
    taps = ["mid", "us3", "us6", "us9"]
    result = noise_variance_analysis(backbone, imgs, ts, taps=taps, batch_size=64, seed=0, progress=False)
    result.save_json(out / "variance.json")
    result.plot(out / "variance.png", title="mini model: share of feature variance (frozen model, noisy input)")
    return result.to_dict()


def write_results(args, out: Path, methods, scores, baselines, taps, best_ts, variance, student_t) -> None:
    payload = {
        "date": str(date.today()), "environment": environment_line(), "args": vars(args),
        "student_timestep": student_t, "ensemble_ts": best_ts, "warp": WarpConfig().to_dict(),
        "baselines": baselines,
        "methods": {n: {"family": m.family, "passes": m.passes, "t": m.t,
                        "seeds": [vars(s) for s in scores[n]]} for n, m in methods.items()},
        "variance": variance,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"## mini comparison ({date.today()})", "",
             f"{environment_line()}; bank {args.bank} train images, {args.queries} test queries, seeds {args.seeds}; "
             f"mean ± standard error over seeds, in percent; student timestep {student_t}.", "",
             "Baselines: " + ", ".join(f"{k} {fmt(v)}" for k, v in baselines.items()), ""]
    lines += summary_table(methods, scores)
    for metric, title in (("knn", "kNN top-1 per tap"), ("pck10", "warp PCK@0.1 per tap"),
                          ("pck05", "warp PCK@0.05 per tap")):
        lines += ["", f"### {title}", ""] + per_tap_table(scores, metric, taps)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot_sweep(scores, methods, "knn", "kNN top-1 (%)", out / "knn_vs_t.png")
    plot_sweep(scores, methods, "pck10", "warp PCK@0.1 (%)", out / "pck_vs_t.png")
    print("\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
