"""Figures (PCA colouring, correspondence figures, curves) and the ``cleandift viz`` CLI, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift.cli.main import main
from cleandift.viz.correspondence import (
    correct_mask,
    draw_heatmap,
    draw_matches,
    similarity_map,
    to_rgb_array,
)
from cleandift.viz.pca import pca_rgb, save_pca_png, save_rgb_png
from cleandift.viz.plots import plot_pck_curves, plot_series


def _png(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        im.load()
    return path


def _two_clusters(fg_box=(3, 9, 4, 10), c=16, side=12, seed=0):
    """Background vectors around one mean, a foreground box around another, small noise."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(c, generator=g) * 3, torch.randn(c, generator=g) * 3
    feats = b[:, None, None] + 0.1 * torch.randn(c, side, side, generator=g)
    y0, y1, x0, x1 = fg_box
    feats[:, y0:y1, x0:x1] = a[:, None, None] + 0.1 * torch.randn(c, y1 - y0, x1 - x0, generator=g)
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return feats, mask


# ---------------------------------------------------------------------------------------------- PCA
def test_pca_rgb_finds_the_foreground():
    feats, mask = _two_clusters()
    out = pca_rgb(feats)
    assert out.rgb.shape == (12, 12, 3) and out.foreground.shape == (12, 12)
    assert torch.equal(out.foreground, mask)
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1
    assert (out.rgb[~mask] == 0).all()  # background black
    assert out.rgb[mask].max() == 1.0 and out.rgb[mask].min() == 0.0  # min-max over the foreground


def test_pca_rgb_sign_does_not_depend_on_which_cluster_is_which():
    # a large foreground (more cells than the background) still comes out as foreground: the
    # border decides the sign, not the cluster sizes
    feats, mask = _two_clusters(fg_box=(1, 11, 1, 11))
    assert torch.equal(pca_rgb(feats).foreground, mask)
    assert torch.equal(pca_rgb(-feats).foreground, mask)
    assert torch.equal(pca_rgb(feats, orient="minority").foreground, ~mask)


def test_pca_rgb_batch_is_joint_and_options():
    f1, m1 = _two_clusters(seed=1)
    f2, _ = _two_clusters(fg_box=(0, 5, 0, 5), seed=1)  # same cluster means, other box
    out = pca_rgb(torch.stack([f1, f2]))
    assert out.rgb.shape == (2, 12, 12, 3)
    assert torch.equal(out.foreground[0], m1)
    everything = pca_rgb(f1, fg_threshold=None)
    assert everything.foreground.all() and everything.rgb.min() >= 0 and everything.rgb.max() <= 1
    refit = pca_rgb(f1, refit_foreground=True)
    assert torch.equal(refit.foreground, m1) and refit.rgb.max() <= 1
    tiny = pca_rgb(torch.randn(2, 6, 6))  # fewer channels than components: padded, no crash
    assert tiny.rgb.shape == (6, 6, 3)
    with pytest.raises(ValueError):
        pca_rgb(torch.randn(6, 6))
    with pytest.raises(ValueError, match="orient"):
        pca_rgb(f1, orient="up")


def test_pca_pngs(tmp_path):
    feats, _ = _two_clusters()
    path = save_pca_png(feats, tmp_path / "sub" / "pca.png", size=(96, 48))
    _png(path, (96, 48))
    arr = np.asarray(Image.open(path))
    assert arr[0, 0].tolist() == [0, 0, 0]  # background corner
    _png(save_rgb_png(pca_rgb(feats).rgb, tmp_path / "raw.png"), (12, 12))
    with pytest.raises(ValueError, match="one"):
        save_pca_png(feats[None], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------- correspondence
def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_correct_mask_boundary():
    pred = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    gt = np.zeros((3, 2))
    assert correct_mask(pred, gt, 5.0).tolist() == [True, True, False]
    assert correct_mask(pred, gt, 5.0, inclusive=False).tolist() == [True, False, False]


def test_draw_matches(tmp_path):
    src, trg = _image(60, 80, 0), _image(90, 50, 1)
    src_xy = torch.tensor([[10.0, 10.0], [40.0, 30.0]])
    pred = torch.tensor([[5.0, 8.0], [30.0, 80.0]])
    gt = torch.tensor([[5.0, 9.0], [10.0, 10.0]])
    path = draw_matches(src, trg, src_xy, pred, tmp_path / "m.png", gt_xy=gt, threshold=5.0)
    _png(path, (1200, 600))
    again = draw_matches(src, trg, src_xy, pred, tmp_path / "m2.png", gt_xy=gt, threshold=5.0)
    assert path.read_bytes() == again.read_bytes()  # deterministic
    _png(draw_matches(src, trg, src_xy, pred, tmp_path / "n.png", figsize=(6, 3), dpi=50), (300, 150))
    img = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    green = ((img[:, 1] > 150) & (img[:, 0] < 100) & (img[:, 2] < 150)).sum()
    red = ((img[:, 0] > 200) & (img[:, 1] < 100) & (img[:, 2] < 100)).sum()
    assert green > 20 and red > 20  # one correct (green) and one wrong (red) match drawn
    with pytest.raises(ValueError):
        draw_matches(src, trg, src_xy, pred[:1], tmp_path / "bad.png")


def test_similarity_map_and_heatmap(tmp_path):
    feats = torch.randn(8, 6, 6)
    sim = similarity_map(feats, feats, (19.5, 11.5), (48, 48))  # centre of cell (row 1, col 2)
    assert sim.shape == (6, 6)
    assert torch.argmax(sim).item() == 1 * 6 + 2 and sim.max() == pytest.approx(1.0, abs=1e-5)
    src = torch.rand(3, 40, 60) * 2 - 1  # tensors in [-1, 1] are accepted too
    assert to_rgb_array(src).shape == (40, 60, 3)
    path = draw_heatmap(src, _image(50, 70, 2), (10, 20), torch.randn(5, 7), tmp_path / "h.png",
                        pred_xy=(30, 20), gt_xy=(31, 22), title="query")
    _png(path, (1200, 600))


# ---------------------------------------------------------------------------------------------- plots
def test_plots(tmp_path):
    curves = {"DIFT": ([261, 0, 100], [59.6, 50.0, 57.0]), "other": ([0, 500], [40.0, 30.0])}
    path = plot_pck_curves(curves, tmp_path / "c.png", constants={"CleanDIFT": 61.4}, title="SPair")
    _png(path, (800, 500))
    assert plot_pck_curves(curves, tmp_path / "c2.png", constants={"CleanDIFT": 61.4},
                           title="SPair").read_bytes() == path.read_bytes()
    _png(plot_series({"base": [1, 2, 3], "clean": [2, 3, 4]}, tmp_path / "b.png", labels=["a", "b", "c"],
                     annotate=True), (800, 500))
    _png(plot_series({"x": [1, 2]}, tmp_path / "l.png", kind="line", figsize=(4, 3), dpi=50), (200, 150))
    with pytest.raises(ValueError, match="same length"):
        plot_series({"a": [1], "b": [1, 2]}, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        plot_pck_curves({"a": ([1, 2], [1.0])}, tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("viz-cli")
    _image(90, 120, 3).save(root / "a.png")
    _image(100, 80, 4).save(root / "b.png")
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       patch_size=14, image_size=112)
    Dinov2Model(cfg).save_pretrained(str(root / "dino"))
    return root


def _fused(pipeline, root) -> list[str]:
    return ["--model", str(pipeline), "--dino", str(root / "dino"), "--dino-size", "112", "--dino-layer", "-1",
            "--sd-size", "128"]


def test_cli_pca_fused(tiny_pipeline_dir, cli_files, capsys):
    out = cli_files / "pca"
    code = main(["viz", "pca", str(cli_files / "a.png"), str(cli_files / "b.png"), "--features", "sd-dino",
                 *_fused(tiny_pipeline_dir, cli_files), "--out", str(out), "--out-size", "64"])
    assert code == 0
    _png(out / "a_pca.png", (64, 48))  # original aspect (120 x 90), longer side 64
    _png(out / "b_pca.png", (51, 64))
    assert "a_pca.png" in capsys.readouterr().out


def test_cli_match_sd(tiny_pipeline_dir, cli_files, capsys):
    student = tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"  # a plain U-Net state dict
    out = cli_files / "match.png"
    code = main(["viz", "match", str(cli_files / "a.png"), str(cli_files / "b.png"), "--points", "10,20; 60,40",
                 "--gt", "12,22;50,50", "--bbox", "0,0,40,60", "--model", str(tiny_pipeline_dir), "--size", "128",
                 "--checkpoint", str(student), "--out", str(out)])
    assert code == 0
    _png(out, (1200, 600))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["pred"]) == 2 and report["threshold"] == pytest.approx(6.0) and len(report["correct"]) == 2
    assert main(["viz", "match", "a", "b", "--points", "1,2,3", "--out", str(out)]) == 2  # bad points: message


def test_cli_heatmap_tlfr(tiny_pipeline_dir, cli_files, capsys):
    out = cli_files / "heat.png"
    code = main(["viz", "heatmap", str(cli_files / "a.png"), str(cli_files / "b.png"), "--point", "30,40",
                 "--gt", "20,20", "--features", "tlfr", *_fused(tiny_pipeline_dir, cli_files), "--out", str(out)])
    assert code == 0
    _png(out, (1200, 600))
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pred"]
    assert 0 <= pred[0] <= 79 and 0 <= pred[1] <= 99  # inside the original target image


def test_cli_curves(tmp_path, capsys):
    key = "pck@0.10/bbox/per-point"
    for i, (t, v) in enumerate([(261, 50.0), (100, 40.0), (500, 30.0)]):
        (tmp_path / f"n{i}.json").write_text(json.dumps({"results": {key: v}, "settings": {
            "preset": "dift-spair", "mode": "noisy", "t": t}}))
    (tmp_path / "c.json").write_text(json.dumps({"results": {key: 61.0}, "settings": {
        "preset": "cleandift-spair", "mode": "clean", "t": 261}}))
    (tmp_path / "extra.json").write_text(json.dumps({"curves": {"naive clean": {"t": [0, 261], "pck": [50, 55]}},
                                                     "constants": {"TLFR": 69.6}}))
    files = [str(p) for p in sorted(tmp_path.glob("*.json"))]
    assert main(["viz", "curves", *files, "--out", str(tmp_path / "curves.png"), "--title", "SPair"]) == 0
    _png(tmp_path / "curves.png", (800, 500))
    from cleandift.cli.viz import read_curves

    curves, constants, ylabel = read_curves([tmp_path / p for p in ("n0.json", "n1.json", "n2.json", "c.json")],
                                            key)
    assert curves == {"dift-spair": ([100.0, 261.0, 500.0], [40.0, 50.0, 30.0])}
    assert constants == {"cleandift-spair": 61.0} and ylabel == key
    sweep = tmp_path / "sweep.json"  # `cleandift analyze sweep` output
    sweep.write_text(json.dumps({"metric": "rmse", "rows": [
        {"method": "noisy", "t": 300, "ensemble": 8, "score": 0.5}, {"method": "noisy", "t": 0, "ensemble": 8,
                                                                    "score": 0.7},
        {"method": "clean", "t": None, "ensemble": None, "score": 0.4}]}))
    curves, constants, ylabel = read_curves([sweep])
    assert curves == {"noisy": ([0.0, 300.0], [0.7, 0.5])} and constants == {"clean": 0.4} and ylabel == "rmse"
    assert main(["viz", "curves", files[0], "--metric", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "available" in capsys.readouterr().err
    assert main(["viz"]) == 1


def test_map_to_original_drops_padding():
    from cleandift.cli.viz import map_to_original
    from cleandift.images import resize_image

    _, tf = resize_image(Image.new("RGB", (64, 32)), 64, "pad")  # content rows 16..47 of the frame
    cells = torch.arange(64, dtype=torch.float32).view(8, 8, 1).expand(8, 8, 3) / 63
    out = map_to_original(cells, tf, 64)
    assert out.shape == (32, 64, 3)
    assert out[0, 0, 0] == cells[2, 0, 0] and out[-1, -1, 0] == cells[5, 7, 0]
