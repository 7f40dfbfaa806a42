"""``cleandift demo`` on the bundled Fashion-MNIST model: the whole method, offline, in a few minutes on a CPU.

1. loads the pixel-space diffusion model and its CleanDIFT student (shipped in the package);
2. runs a short distillation (a few dozen steps from the frozen model, loss printed) to show training works;
3. extracts features of the bundled Fashion-MNIST test images four ways -- CleanDIFT (one clean pass), DIFT
   with one noise draw, DIFT averaged over 8 draws, and the frozen model on the clean image at t = 0;
4. scores them (kNN top-1 against the bundled training images, PCK on random warps) and times them;
5. writes an HTML report with the table, correspondence figures (clean vs noisy), PCA-RGB maps and the
   distillation loss, and prints where it is.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path

import torch

from .backbones.pixel import PixelDiffusionBackbone
from .errors import ConfigError
from .logs import quiet_logger

DEMO_TAPS = ("mid", "us1", "us2", "us3", "us4", "us5", "us6", "us7", "us8", "us9", "us10")
DEMO_T = 261


DEMO_VAL = 100  #: bundled training images outside the kNN bank that pick each method's best tap
TIMING_BATCH, TIMING_REPEATS = 8, 5  #: timing: median of 5 rounds on 8 test images, after a warm-up call
#: U-Net samples per forward: on a CPU, 32 of these 32-px images per call ran ~20 % faster than 250 (cache)
DEMO_CHUNK = 32
DEMO_MARKER = ".cleandift-demo"  #: marks an --out folder as the demo's own, so a rerun may replace its parts
OWN_FOLDERS = ("distill", "figures")  #: what a rerun replaces (the short run and the figures of the last one)


def run_mini_demo(out_dir: str | Path, seed: int = 0, model: str | None = None, student: str | None = None,
                  distill_steps: int = 40, queries: int = 300, bank: int = 1000) -> Path:
    """Run the demo; ``model`` / ``student`` default to the bundled ones. Returns the report folder.

    Without a shipped student (``student=None`` and none bundled) the CleanDIFT rows use the student
    of the short distillation -- a few dozen steps, so expect it to be only a little better than its start.
    Running it again in the same folder replaces the previous demo's outputs.
    """
    from .backbones.loading import load_backbone  # noqa: PLC0415
    from .pretrain.idx import BUNDLED_SUBSET_DIR, load_idx_dataset, to_model_range  # noqa: PLC0415

    t_start = time.perf_counter()
    out = Path(out_dir)
    check_demo_settings(bank, queries, distill_steps)
    prepare_out_dir(out)
    backbone = load_backbone(model or "mini", dtype=torch.float32)
    if not isinstance(backbone, PixelDiffusionBackbone):
        raise ConfigError(f"the demo runs on a pixel-space model (mini); {model!r} is a {type(backbone).__name__}")
    train_x, train_y = load_idx_dataset(BUNDLED_SUBSET_DIR, "train")
    test_x, test_y = load_idx_dataset(BUNDLED_SUBSET_DIR, "test")
    train_all = to_model_range(train_x, backbone.resolution)
    train = train_all[:bank], train_y[:bank]
    val = train_all[bank:bank + DEMO_VAL], train_y[bank:bank + DEMO_VAL]  # disjoint from bank and test
    test = to_model_range(test_x, backbone.resolution)[:queries], test_y[:queries]
    print(f"model: {backbone.name} ({sum(p.numel() for p in backbone.unet.parameters()) / 1e6:.2f} M U-Net "
          f"parameters, {backbone.resolution} px); data: {len(train[0])} bundled training images (kNN bank), "
          f"{len(val[0])} other training images (validation: picks each method's tap), {len(test[0])} held-out "
          "test images (scored)")

    print(f"\n[1/4] short distillation ({distill_steps} steps, to show training runs) ...")
    distill = short_distillation(backbone, BUNDLED_SUBSET_DIR, out / "distill", distill_steps, seed)
    shipped = _load_shipped_student(backbone, student, bundled=model in (None, "mini"))
    if shipped is None:
        student_unet, student_t, student_label = distill["student"], distill["timestep"], "CleanDIFT (demo run)"
        print("      no shipped student: the CleanDIFT row uses this short run's student")
    else:
        (student_unet, student_t), student_label = shipped, "CleanDIFT"
        print("      the CleanDIFT row below is the shipped student (fully trained), not this short run")

    print("\n[2/4] extracting and scoring features ...")
    table, methods, data = score_methods(backbone, student_unet, student_t, student_label, train, test, seed, val)
    print_table(table)

    print("\n[3/4] figures ...")
    figures = make_figures(methods, data, table, out / "figures", student_label, distill["losses"])

    print("\n[4/4] report ...")
    report = write_report(out, backbone, table, figures, distill, student_label, student_t,
                          time.perf_counter() - t_start, shipped=shipped is not None,
                          student_source=student or "bundled")
    (out / "results.json").write_text(json.dumps({
        "table": table, "distillation": distill["losses"], "student_timestep": student_t,
        "student": "shipped" if shipped is not None else "demo run",
        "units": "knn, pck10, pck05: fractions in [0, 1]; ms_per_image: median milliseconds",
        "protocol": {"bank": len(train[0]), "validation": len(val[0]), "test": len(test[0]),
                     "tap_selection": "best tap per method and metric on the validation images",
                     "timing": f"median of {TIMING_REPEATS} rounds (every method once per round) on "
                               f"{TIMING_BATCH} test images, after a warm-up call"},
    }, indent=1) + "\n")
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; open {report.resolve()}")
    return out


def check_demo_settings(bank: int, queries: int, distill_steps: int) -> None:
    """Refuse sizes the bundled data cannot serve, before anything is loaded."""
    from .pretrain.idx import BUNDLED_SUBSET_SIZES  # noqa: PLC0415

    n_train, n_test = (10 * BUNDLED_SUBSET_SIZES[s] for s in ("train", "test"))
    if not 10 <= bank <= n_train - DEMO_VAL:
        raise ConfigError(f"--bank {bank}: between 10 (k of the kNN) and {n_train - DEMO_VAL} (the bundled "
                          f"{n_train} training images less the {DEMO_VAL} kept for validation)")
    if not 1 <= queries <= n_test:
        raise ConfigError(f"--queries {queries}: between 1 and {n_test} (the bundled test images)")
    if distill_steps < 1:
        raise ConfigError(f"--distill-steps {distill_steps}: at least 1")


def prepare_out_dir(out: Path) -> None:
    """Make ``out`` the demo's: a rerun replaces its previous short run and figures (a demo just works).

    Folders it did not write are never deleted: an ``out`` that holds a ``distill/`` or ``figures/``
    without the demo's marker (or the report of a demo from before the marker) is refused.
    """
    own = (out / DEMO_MARKER).is_file() or ((out / "report.html").is_file() and (out / "results.json").is_file())
    present = [out / name for name in OWN_FOLDERS if (out / name).exists()]
    if present and not own:
        raise ConfigError(f"{present[0]} exists and was not written by `cleandift demo`; choose another --out")
    for folder in present:
        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `cleandift demo`; a rerun replaces distill/ and figures/\n")


# ---------------------------------------------------------------------------------------------- steps
def short_distillation(backbone: PixelDiffusionBackbone, data: Path, run_dir: Path, steps: int, seed: int) -> dict:
    """A few CleanDIFT steps from the frozen model with the package's trainer; per-step losses printed.

    ``data`` is idx data (the bundled Fashion-MNIST subset): the trainer pads it exactly as pretraining did.
    """
    from .train import TrainConfig, train  # noqa: PLC0415

    losses: list[float] = []

    def on_step(step: int, logs: dict) -> None:
        losses.append(float(logs["loss"]))
        if step == 1 or step % 10 == 0 or step == steps:
            print(f"      step {step:3d}/{steps}  alignment loss {logs['loss']:.4f}")

    config = TrainConfig(model="mini", data=str(data), out=str(run_dir / "run"), max_steps=steps,
                         batch_size=16, size=backbone.resolution, resize="crop", captions=False, workers=0,
                         lr=3e-4, warmup_steps=5, seed=seed, checkpoint_every=0, val_images=16,
                         val_every=steps, log_every=1, export=True, sample_posterior=False)
    with quiet_logger("cleandift.train"):  # the demo prints its own short log; the trainer's details go to run_dir
        result = train(config, backbone=backbone, callbacks=[on_step], progress=False)
    student = _load_shipped_student(backbone, str(result.export_dir))  # export -> load: what users do
    return {"losses": losses, "student": student[0], "timestep": student[1], "val_loss": result.val_loss,
            "export": str(result.export_dir)}


def _load_shipped_student(backbone: PixelDiffusionBackbone, student: str | None, bundled: bool = False):
    """The given student, else (``bundled``: the model is the shipped one) the shipped student, else None."""
    from .backbones.pixel import BUNDLED_MINI_STUDENT_DIR  # noqa: PLC0415
    from .checkpoints import load_student, read_checkpoint  # noqa: PLC0415

    path = student or (str(BUNDLED_MINI_STUDENT_DIR)
                       if bundled and (BUNDLED_MINI_STUDENT_DIR / "unet").is_dir() else None)
    if path is None:
        return None
    unet, ckpt = load_student(backbone.unet, read_checkpoint(path))
    return unet.eval().requires_grad_(False), float(ckpt.timestep if ckpt.timestep is not None else DEMO_T)


def score_methods(backbone, student_unet, student_t, student_label, train, test, seed, val):
    """kNN + warp PCK on the test images and timing of the four methods.

    Each method's tap (one for kNN, one for PCK) is the best on ``val`` -- images disjoint from the
    bank and the test set -- and the table reports the test score at that tap, so no number is
    picked on the data it is reported on. Times are medians over repeated calls after a warm-up.
    """
    from .eval.method_comparison import (Method, make_eval_set, pick_best, score_method_splits,  # noqa: PLC0415
                                         time_methods)
    from .eval.warp import WarpConfig, make_warp_pairs, nothing_moves  # noqa: PLC0415
    from .extract import CleanExtractor, NoisyExtractor  # noqa: PLC0415
    from .pretrain.probe import pixel_baselines  # noqa: PLC0415

    taps = [t for t in DEMO_TAPS if t in backbone.taps]
    chunk = DEMO_CHUNK
    methods = {m.name: m for m in (
        Method.of(student_label, "cleandift",
                  CleanExtractor(backbone, unet=student_unet, timestep=student_t, taps=taps, chunk_size=chunk)),
        Method.of(f"DIFT t={DEMO_T}, 1 draw", "noisy",
                  NoisyExtractor(backbone, t=DEMO_T, ensemble=1, taps=taps, chunk_size=chunk)),
        Method.of(f"DIFT t={DEMO_T}, 8 draws", "ensemble",
                  NoisyExtractor(backbone, t=DEMO_T, ensemble=8, taps=taps, chunk_size=chunk)),
        Method.of("frozen model, clean, t=0", "clean-t0", CleanExtractor(backbone, timestep=0, taps=taps,
                                                                         chunk_size=chunk)),
    )}
    warp = WarpConfig()
    data = make_eval_set(train, test, seed, len(train[0]), len(test[0]), 16, warp)
    splits = {"test": (data.pairs, data.query_labels),
              "val": (make_warp_pairs(val[0], warp, n_points=16, seed=seed + 1), val[1])}
    bank = (data.bank, data.bank_labels)
    base_val = pixel_baselines(bank, (splits["val"][0].source, val[1]))
    base_test = pixel_baselines(bank, (data.pairs.source, data.query_labels))
    pixel_key, pixel_knn = pick_best(base_val, base_test)
    still = nothing_moves(data.pairs)
    table = [{"method": "raw pixels / nothing moves", "passes": 0, "ms_per_image": 0.0, "knn": pixel_knn,
              "knn_tap": pixel_key, "pck10": still["pck@0.10"], "pck05": still["pck@0.05"], "pck_tap": "-"}]
    for name, method in methods.items():
        scores = score_method_splits(method, data, splits, taps, batch=250)
        s_val, s_test = scores["val"], scores["test"]
        knn_tap, knn = pick_best(s_val.knn, s_test.knn)
        pck_tap, pck10 = pick_best(s_val.pck10, s_test.pck10)
        table.append({"method": name, "passes": method.passes, "ms_per_image": float("nan"), "knn": knn,
                      "knn_tap": knn_tap, "pck10": pck10, "pck05": s_test.pck05[pck_tap], "pck_tap": pck_tap})
        print(f"      {name}: done")
    seconds = time_methods(methods, data.pairs.source[:TIMING_BATCH], repeats=TIMING_REPEATS, seed=seed)
    for row in table[1:]:
        row["ms_per_image"] = 1000 * seconds[row["method"]]
    return table, methods, data


def print_table(table: list[dict]) -> None:
    print(f"\n      {'method':<30} {'passes':>6} {'ms/img':>7} {'kNN top-1':>10} {'PCK@0.1':>8} {'PCK@0.05':>9}")
    for r in table:
        print(f"      {r['method']:<30} {r['passes']:>6} {r['ms_per_image']:>7.2f} {100 * r['knn']:>9.1f}% "
              f"{100 * r['pck10']:>7.1f}% {100 * r['pck05']:>8.1f}%")


def make_figures(methods, data, table, folder: Path, student_label: str, losses: list[float]) -> dict[str, str]:
    """Matches (clean vs 1-draw DIFT), PCA-RGB maps, and the distillation loss curve, as PNGs."""
    from .eval.warp import predict_matches  # noqa: PLC0415
    from .viz.correspondence import draw_matches  # noqa: PLC0415
    from .viz.pca import pca_rgb, save_rgb_png  # noqa: PLC0415
    from .viz.plots import plot_series  # noqa: PLC0415

    figures: dict[str, str] = {}
    pairs, scale = data.pairs, 8
    g = torch.Generator().manual_seed(0)
    noisy_name = next(n for n in methods if n.endswith("1 draw"))
    pck_tap = {r["method"]: r["pck_tap"] for r in table}
    for name in (student_label, noisy_name):
        tap = pck_tap[name]
        for i in range(3):
            src = methods[name].extract(pairs.source[i:i + 1], g)[tap]
            trg = methods[name].extract(pairs.target[i:i + 1], g)[tap]
            keep = pairs.valid[i]
            pred = predict_matches(src, trg, pairs.src_xy[i:i + 1], pairs.image_size)[0][keep]
            path = folder / f"matches_{_slug(name)}_{i}.png"
            draw_matches(_big(pairs.source[i], scale), _big(pairs.target[i], scale),
                         _scale_xy(pairs.src_xy[i][keep], scale), _scale_xy(pred, scale), path,
                         gt_xy=_scale_xy(pairs.trg_xy[i][keep], scale), threshold=0.1 * 32 * scale,
                         title=f"{name}, tap {tap}:", figsize=(6, 3.3))
            figures[f"matches {name} {i}"] = str(path.relative_to(folder.parent))
    images = pairs.source[:8]
    for name in (student_label, noisy_name):
        feats = methods[name].extract(images, g)["us6"]
        for i in range(len(images)):
            rgb = pca_rgb(feats[i], None).rgb
            path = folder / f"pca_{_slug(name)}_{i}.png"
            save_rgb_png(rgb, path, size=96)
            figures[f"pca {name} {i}"] = str(path.relative_to(folder.parent))
    for i in range(len(images)):
        path = folder / f"image_{i}.png"
        _big(images[i], 3).save(path)
        figures[f"image {i}"] = str(path.relative_to(folder.parent))
    if losses:
        path = plot_series({"alignment loss": losses}, folder / "distill_loss.png", kind="line",
                           labels=[str(i + 1) for i in range(len(losses))], xlabel="step", ylabel="loss",
                           title=f"the demo's short CleanDIFT distillation ({len(losses)} steps)", figsize=(6.0, 3.5))
        figures["loss"] = str(Path(path).relative_to(folder.parent))
    return figures


def _big(image: torch.Tensor, scale: int):
    from PIL import Image  # noqa: PLC0415

    arr = image.float().mean(0).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr).convert("RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _scale_xy(xy: torch.Tensor, scale: int) -> torch.Tensor:
    return (xy + 0.5) * scale - 0.5


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def write_report(out: Path, backbone, table, figures, distill, student_label, student_t, seconds, *,
                 shipped: bool = True, student_source: str = "bundled") -> Path:
    rows = "\n".join(
        f"<tr><td>{html.escape(r['method'])}</td><td>{r['passes']}</td><td>{r['ms_per_image']:.2f}</td>"
        f"<td>{100 * r['knn']:.1f} ({html.escape(r['knn_tap'])})</td><td>{100 * r['pck10']:.1f}</td>"
        f"<td>{100 * r['pck05']:.1f} ({html.escape(r['pck_tap'])})</td></tr>" for r in table)

    def imgs(prefix: str) -> str:
        return "".join(f'<img src="{html.escape(p)}">' for k, p in figures.items() if k.startswith(prefix))

    losses = distill["losses"]
    if shipped:
        where = ("bundled with the package" if student_source == "bundled"
                 else f"<code>{html.escape(student_source)}</code>")
        student_note = (f"<p><b>The \u201c{html.escape(student_label)}\u201d row is the shipped, fully trained "
                        f"student</b> ({where}), not the {len(losses)}-step run the demo trains below: that short run "
                        "only shows that distillation works end to end.</p>")
    else:
        student_note = (f"<p><b>The \u201c{html.escape(student_label)}\u201d row is the demo's own "
                        f"{len(losses)}-step distillation</b> (no shipped student for this model), so expect it to "
                        "be only a little better than the frozen model it starts from.</p>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cleandift demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{margin:2px;image-rendering:pixelated}}</style></head><body>
<h1>cleandift demo: clean features vs noisy (DIFT) features</h1>
<p>Model: <code>{html.escape(backbone.name)}</code>, a pixel-space class-conditional diffusion model trained by the
project on Fashion-MNIST (32 px). Test images are held out from its training. Student timestep
{student_t:.1f}. Run time {seconds:.0f} s on this machine.</p>
{student_note}
<h2>Results</h2>
<table><tr><th>method</th><th>U-Net passes</th><th>ms / image</th><th>kNN top-1 % (tap)</th><th>PCK@0.1 %</th>
<th>PCK@0.05 % (tap)</th></tr>
{rows}</table>
<p>kNN: k = 10, cosine, globally pooled features, bank = bundled training images, null prompt. PCK: each test
image against a random strong warp of itself (rotation up to 45°, scale 0.7–1.3, translation, perspective,
elastic), 16 points on the object, threshold α·32 px. The first row gives raw-pixel kNN and the "nothing moves"
PCK. <b>Taps</b>: for each method, the tap in brackets is the best one on a separate validation set (other bundled
training images with their own warps, disjoint from the bank and the test images); the numbers are that tap's
scores on the test images. <b>Timing</b>: median of {TIMING_REPEATS} extractions of a batch of {TIMING_BATCH} test
images per method after one untimed warm-up call; the methods take turns, so a change in the machine's load
affects all of them alike. The full per-tap comparison with standard errors over seeds is
<code>benchmarks/mini_comparison.py</code>.</p>
<h2>Correspondences</h2><p>Source points (left) and their best match in the warped image (right); green within
0.1 × 32 px of the truth, crosses mark the truth.</p>
<h3>{html.escape(student_label)}</h3>{imgs('matches ' + student_label)}
<h3>DIFT, one noise draw</h3>{imgs('matches DIFT')}
<h2>PCA-RGB feature maps (tap us6)</h2><p>Images, then {html.escape(student_label)}, then DIFT (1 draw).</p>
<div>{imgs('image ')}</div><div>{imgs('pca ' + student_label)}</div><div>{imgs('pca DIFT')}</div>
<h2>Short distillation</h2><p>{len(losses)} steps from the frozen model with <code>cleandift.train</code>, to show that
training runs{' (this run is <i>not</i> the student in the table above)' if shipped else ''}:
alignment loss {losses[0] if losses else float('nan'):.4f} → {losses[-1] if losses else float('nan'):.4f}
(validation {distill.get('val_loss') or float('nan'):.4f}).</p>{imgs('loss')}
</body></html>"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
