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
import time
from pathlib import Path

import torch

from .backbones.pixel import PixelDiffusionBackbone
from .logs import quiet_logger

DEMO_TAPS = ("mid", "us1", "us2", "us3", "us4", "us5", "us6", "us7", "us8", "us9", "us10")
DEMO_T = 261


def run_mini_demo(out_dir: str | Path, seed: int = 0, model: str | None = None, student: str | None = None,
                  distill_steps: int = 40, queries: int = 300, bank: int = 1000) -> Path:
    """Run the demo; ``model`` / ``student`` default to the bundled ones. Returns the report folder.

    Without a shipped student (``student=None`` and none bundled) the CleanDIFT rows use the student
    of the short distillation -- a few dozen steps, so expect it to be only a little better than its start.
    """
    from .backbones.loading import load_backbone  # noqa: PLC0415
    from .pretrain.idx import BUNDLED_SUBSET_DIR, load_idx_dataset, to_model_range  # noqa: PLC0415

    t_start = time.perf_counter()
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(model or "mini", dtype=torch.float32)
    if not isinstance(backbone, PixelDiffusionBackbone):
        raise ValueError(f"the demo runs on a pixel-space model (mini); {model!r} is a {type(backbone).__name__}")
    train_x, train_y = load_idx_dataset(BUNDLED_SUBSET_DIR, "train")
    test_x, test_y = load_idx_dataset(BUNDLED_SUBSET_DIR, "test")
    train = to_model_range(train_x, backbone.resolution)[:bank], train_y[:bank]
    test = to_model_range(test_x, backbone.resolution)[:queries], test_y[:queries]
    print(f"model: {backbone.name} ({sum(p.numel() for p in backbone.unet.parameters()) / 1e6:.2f} M U-Net "
          f"parameters, {backbone.resolution} px); data: {len(train[0])} bundled training images (kNN bank), "
          f"{len(test[0])} held-out test images")

    print(f"\n[1/4] short distillation ({distill_steps} steps) ...")
    distill = short_distillation(backbone, BUNDLED_SUBSET_DIR, out / "distill", distill_steps, seed)
    shipped = _load_shipped_student(backbone, student, bundled=model in (None, "mini"))
    if shipped is None:
        student_unet, student_t, student_label = distill["student"], distill["timestep"], "CleanDIFT (demo run)"
        print("      no shipped student: the CleanDIFT rows use this short run's student")
    else:
        (student_unet, student_t), student_label = shipped, "CleanDIFT"

    print("\n[2/4] extracting and scoring features ...")
    table, methods, data = score_methods(backbone, student_unet, student_t, student_label, train, test, seed)
    print_table(table)

    print("\n[3/4] figures ...")
    figures = make_figures(methods, data, table, out / "figures", student_label, distill["losses"])

    print("\n[4/4] report ...")
    report = write_report(out, backbone, table, figures, distill, student_label, student_t,
                          time.perf_counter() - t_start)
    (out / "results.json").write_text(json.dumps({"table": table, "distillation": distill["losses"],
                                                  "student_timestep": student_t}, indent=1) + "\n")
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; open {report.resolve()}")
    return out


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


def score_methods(backbone, student_unet, student_t, student_label, train, test, seed):
    """kNN + warp PCK + seconds per image of the four methods (best tap per metric)."""
    from .eval.method_comparison import Method, make_eval_set, score_method  # noqa: PLC0415
    from .eval.warp import WarpConfig, nothing_moves  # noqa: PLC0415
    from .extract import CleanExtractor, NoisyExtractor  # noqa: PLC0415
    from .pretrain.probe import pixel_baselines  # noqa: PLC0415

    taps = [t for t in DEMO_TAPS if t in backbone.taps]
    methods = {m.name: m for m in (
        Method.of(student_label, "cleandift",
                  CleanExtractor(backbone, unet=student_unet, timestep=student_t, taps=taps, chunk_size=250)),
        Method.of(f"DIFT t={DEMO_T}, 1 draw", "noisy",
                  NoisyExtractor(backbone, t=DEMO_T, ensemble=1, taps=taps, chunk_size=250)),
        Method.of(f"DIFT t={DEMO_T}, 8 draws", "ensemble",
                  NoisyExtractor(backbone, t=DEMO_T, ensemble=8, taps=taps, chunk_size=32)),
        Method.of("frozen model, clean, t=0", "clean-t0", CleanExtractor(backbone, timestep=0, taps=taps, chunk_size=250)),
    )}
    data = make_eval_set(train, test, seed, len(train[0]), len(test[0]), 16, WarpConfig())
    table = []
    base = pixel_baselines((data.bank, data.bank_labels), (data.pairs.source, data.query_labels))
    still = nothing_moves(data.pairs)
    table.append({"method": "raw pixels / nothing moves", "passes": 0, "ms_per_image": 0.0,
                  "knn": max(base.values()), "knn_tap": "pixels", "pck10": still["pck@0.10"],
                  "pck05": still["pck@0.05"], "pck_tap": "-"})
    for name, method in methods.items():
        s = score_method(method, data, taps, batch=250)
        knn_tap = max(s.knn, key=s.knn.get)
        pck_tap = max(s.pck10, key=s.pck10.get)
        table.append({"method": name, "passes": method.passes, "ms_per_image": 1000 * s.seconds_per_image,
                      "knn": s.knn[knn_tap], "knn_tap": knn_tap, "pck10": s.pck10[pck_tap],
                      "pck05": s.pck05[pck_tap], "pck_tap": pck_tap})
        print(f"      {name}: done")
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
                         title=f"{name}, tap {tap}: green = within 0.1 x 32 px", figsize=(6, 3.3))
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
                           title="short CleanDIFT distillation", figsize=(6.0, 3.5))
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


def write_report(out: Path, backbone, table, figures, distill, student_label, student_t, seconds) -> Path:
    rows = "\n".join(
        f"<tr><td>{html.escape(r['method'])}</td><td>{r['passes']}</td><td>{r['ms_per_image']:.2f}</td>"
        f"<td>{100 * r['knn']:.1f} ({html.escape(r['knn_tap'])})</td><td>{100 * r['pck10']:.1f}</td>"
        f"<td>{100 * r['pck05']:.1f} ({html.escape(r['pck_tap'])})</td></tr>" for r in table)

    def imgs(prefix: str) -> str:
        return "".join(f'<img src="{html.escape(p)}">' for k, p in figures.items() if k.startswith(prefix))

    losses = distill["losses"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cleandift demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{margin:2px;image-rendering:pixelated}}</style></head><body>
<h1>cleandift demo: clean features vs noisy (DIFT) features</h1>
<p>Model: <code>{html.escape(backbone.name)}</code>, a pixel-space class-conditional diffusion model trained by the
project on Fashion-MNIST (32 px). Test images are held out from its training. Student timestep
{student_t:.1f}. Run time {seconds:.0f} s on this machine.</p>
<h2>Results</h2>
<table><tr><th>method</th><th>U-Net passes</th><th>ms / image</th><th>kNN top-1 % (tap)</th><th>PCK@0.1 %</th>
<th>PCK@0.05 % (tap)</th></tr>
{rows}</table>
<p>kNN: k = 10, cosine, globally pooled features, bank = bundled training images, null prompt. PCK: each test
image against a random strong warp of itself (rotation up to 45°, scale 0.7–1.3, translation, perspective,
elastic), 16 points on the object, threshold α·32 px. The first row gives raw-pixel kNN and the "nothing moves"
PCK. Best tap per metric and method; the full per-tap comparison with standard errors over seeds is
<code>benchmarks/mini_comparison.py</code>.</p>
<h2>Correspondences</h2><p>Source points (left) and their best match in the warped image (right); green within
0.1 × 32 px of the truth, crosses mark the truth.</p>
<h3>{html.escape(student_label)}</h3>{imgs('matches ' + student_label)}
<h3>DIFT, one noise draw</h3>{imgs('matches DIFT')}
<h2>PCA-RGB feature maps (tap us6)</h2><p>Images, then {html.escape(student_label)}, then DIFT (1 draw).</p>
<div>{imgs('image ')}</div><div>{imgs('pca ' + student_label)}</div><div>{imgs('pca DIFT')}</div>
<h2>Short distillation</h2><p>{len(losses)} steps from the frozen model with <code>cleandift.train</code>:
alignment loss {losses[0] if losses else float('nan'):.4f} → {losses[-1] if losses else float('nan'):.4f}
(validation {distill.get('val_loss') or float('nan'):.4f}).</p>{imgs('loss')}
</body></html>"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
