"""NYUv2 depth probe: readers (real .mat layout, folder layout), SigLoss, metrics, learning, CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cleandift.errors import DatasetError
from cleandift.eval.depth import (
    DepthFolder, DepthMetrics, DepthProbe, NYUv2Labeled, depth_errors, open_depth_dataset, run_depth_probe, sig_loss,
)
from cleandift.eval.probe_common import FeatureSpec, ProbeTrainConfig, sample_frame_grid, sample_original
from cleandift.images import resize_image

H, W = 32, 40  # non-square, so a transposition bug cannot go unnoticed


class PoolExtractor:
    """Synthetic features: the image averaged over 8x8 cells (channel 0 = red)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts=None, taps=None):
        self.calls += 1
        return {"f": F.avg_pool2d(images, 8)}


def _scenes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB (N,H,W,3) uint8 whose red channel is a vertical ramp, and depth = 1 + 4 * red/255 metres."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, H, W, 3), np.uint8)
    deps = np.zeros((n, H, W), np.float32)
    for i in range(n):
        top, bottom = rng.uniform(0, 1, 2)
        red = np.round((top + (bottom - top) * (np.arange(H) + 0.5) / H) * 255)
        imgs[i, :, :, 0] = red[:, None]
        imgs[i, :, :, 1] = rng.integers(0, 256, (H, W))
        deps[i] = (1 + 4 * red / 255)[:, None]
    return imgs, deps


def write_nyu_mat(folder, imgs, deps, train_idx=None, test_idx=None):
    """The official labelled-set layout: HDF5 (v7.3) .mat, arrays in transposed MATLAB order + splits.mat (1-based)."""
    h5py = pytest.importorskip("h5py")
    scipy_io = pytest.importorskip("scipy.io")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["images"] = imgs.transpose(0, 3, 2, 1)  # (N, 3, W, H)
        f["depths"] = deps.transpose(0, 2, 1)  # (N, W, H)
    with open(path, "r+b") as f:  # MATLAB writes a text header into the userblock
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    if train_idx is not None:
        scipy_io.savemat(folder / "splits.mat", {"trainNdxs": np.asarray(train_idx, dtype=np.float64).reshape(-1, 1),
                                                 "testNdxs": np.asarray(test_idx, dtype=np.float64).reshape(-1, 1)})
    return path


def write_depth_folder(root, imgs, deps, split=None):
    base = root / split if split else root
    (base / "rgb").mkdir(parents=True, exist_ok=True)
    (base / "depth").mkdir(parents=True, exist_ok=True)
    for i, (img, dep) in enumerate(zip(imgs, deps)):
        Image.fromarray(img).save(base / "rgb" / f"img{i:03d}.png")
        Image.fromarray(np.round(dep * 1000).astype(np.uint16)).save(base / "depth" / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    imgs, deps = _scenes(12)
    folder = tmp_path_factory.mktemp("nyu")
    return write_nyu_mat(folder, imgs, deps, range(1, 9), range(9, 13)), imgs, deps


# ---------------------------------------------------------------------------------------------- readers
def test_nyu_mat_reader_undoes_matlab_transpose(nyu):
    path, imgs, deps = nyu
    train, test = NYUv2Labeled(path, "train"), NYUv2Labeled(path, "test")
    assert (len(train), len(test)) == (8, 4)
    s = test[1]  # MATLAB index 10 -> row 9
    assert s.name == "nyu_0010"
    assert s.image.size == (W, H)
    assert s.depth.shape == (H, W)
    np.testing.assert_array_equal(np.asarray(s.image), imgs[9])
    np.testing.assert_allclose(s.depth, deps[9])
    assert len(NYUv2Labeled(path, "all")) == 12
    assert len(open_depth_dataset(path.parent, "val")) == 4  # folder holding the .mat; val = test


def test_nyu_errors_name_the_file(tmp_path, nyu):
    path, imgs, deps = nyu
    with pytest.raises(DatasetError, match="missing.mat"):
        NYUv2Labeled(tmp_path / "missing.mat")
    lone = write_nyu_mat(tmp_path / "nosplit", imgs[:2], deps[:2])
    with pytest.raises(DatasetError, match="splits.mat"):
        NYUv2Labeled(lone, "train")
    assert len(NYUv2Labeled(lone, "all")) == 2
    empty = write_nyu_mat(tmp_path / "empty", imgs[:2], deps[:2], [], [1, 2])
    with pytest.raises(DatasetError, match="empty"):
        NYUv2Labeled(empty, "train")
    v5 = tmp_path / "v5" / "nyu_depth_v2_labeled.mat"
    v5.parent.mkdir()
    pytest.importorskip("scipy.io").savemat(v5, {"images": np.zeros((1, 3, 2, 2))})
    with pytest.raises(DatasetError, match="HDF5"):
        NYUv2Labeled(v5, "all")


def test_depth_folder_reader_and_errors(tmp_path):
    imgs, deps = _scenes(3)
    root = write_depth_folder(tmp_path / "d", imgs, deps, "train")
    ds = DepthFolder(root, "train")
    assert len(ds) == 3
    np.testing.assert_allclose(ds[2].depth, np.round(deps[2] * 1000) / 1000, atol=1e-6)
    assert ds[2].image.size == (W, H)
    (root / "train" / "depth" / "img001.png").unlink()
    with pytest.raises(DatasetError, match="img001.png"):
        DepthFolder(root, "train")
    with pytest.raises(DatasetError, match="test"):
        DepthFolder(root, "test")
    empty = tmp_path / "e"
    (empty / "rgb").mkdir(parents=True)
    (empty / "depth").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        DepthFolder(empty)
    eight_bit = write_depth_folder(tmp_path / "b", imgs[:1], deps[:1])
    Image.fromarray(np.full((H, W), 3, np.uint8)).save(eight_bit / "depth" / "img000.png")
    with pytest.raises(DatasetError, match="16-bit"):
        DepthFolder(eight_bit)[0]


# ---------------------------------------------------------------------------------------------- loss / metrics
def test_sig_loss_matches_formula_and_ignores_invalid():
    pred = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0])
    gt = torch.tensor([1.5, 2.0, 0.0, 4.0, 6.0])  # gt == 0 is invalid
    valid = gt > 0
    g = np.log(pred[valid].numpy() + 1e-3) - np.log(gt[valid].numpy() + 1e-3)
    expected = math.sqrt(np.var(g, ddof=1) + 0.15 * np.mean(g) ** 2)
    assert float(sig_loss(pred, gt)) == pytest.approx(expected, rel=1e-5)
    assert float(sig_loss(gt.clamp_min(1.0), gt.clamp_min(1.0))) == pytest.approx(0.0, abs=1e-6)
    assert float(sig_loss(pred, torch.zeros(5))) == 0.0  # nothing valid: 0, not NaN


def test_depth_metrics_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    gt = torch.tensor([[1.0, 1.0], [4.0, 0.0]])  # last pixel invalid
    # errors 0, 1, -1 -> RMSE sqrt(2/3); AbsRel (0 + 1 + 0.25)/3; delta1: ratios 1, 2, 4/3 -> 1/3
    m = depth_errors(pred, gt)
    assert m["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert m["abs_rel"] == pytest.approx(1.25 / 3)
    assert m["delta1"] == pytest.approx(1 / 3)

    second_pred, second_gt = torch.full((2, 2), 2.0), torch.full((2, 2), 2.5)  # err .5, absrel .2, ratio 1.25
    per_image = DepthMetrics(reduction="image")
    per_image.update(pred, gt)
    per_image.update(second_pred, second_gt)
    out = per_image.compute()
    assert out["rmse"] == pytest.approx((math.sqrt(2 / 3) + 0.5) / 2)
    assert out["abs_rel"] == pytest.approx((1.25 / 3 + 0.2) / 2)
    assert out["delta1"] == pytest.approx((1 / 3 + 0.0) / 2)  # 1.25 is not < 1.25
    assert out["num_images"] == 2

    pooled = DepthMetrics(reduction="pixel")
    pooled.update(torch.stack([pred, second_pred]), torch.stack([gt, second_gt]))
    out = pooled.compute()
    assert out["rmse"] == pytest.approx(math.sqrt((2 + 4 * 0.25) / 7))
    assert out["abs_rel"] == pytest.approx((1.25 + 4 * 0.2) / 7)
    assert out["num_pixels"] == 7

    capped = DepthMetrics(max_depth=3.5)  # gt 4.0 leaves the evaluated range
    capped.update(pred, gt)
    assert capped.compute()["num_pixels"] == 2
    with pytest.raises(ValueError):
        DepthMetrics().compute()


def test_depth_probe_head_is_a_bin_average():
    probe = DepthProbe(5, n_bins=256, min_depth=0.1, max_depth=10.0)
    assert torch.allclose(probe.bins[[0, -1]], torch.tensor([0.1, 10.0]))
    assert torch.allclose(probe.bins.diff(), torch.full((255,), 9.9 / 255), atol=1e-5)
    out = probe(torch.randn(2, 5, 3, 4) * 50)
    assert out.shape == (2, 1, 3, 4)
    assert (out >= 0.1).all() and (out <= 10.0).all()
    probs = probe.bin_probabilities(torch.randn(1, 5, 2, 2))
    assert torch.allclose(probs.sum(1), torch.ones(1, 2, 2)) and (probs > 0).all()  # relu + 0.1 > 0


def test_geometry_roundtrip_for_every_resize_policy():
    img = Image.new("RGB", (W, H))
    ramp = torch.linspace(1, 5, H)[:, None].expand(H, W)[None].contiguous()
    for policy in ("stretch", "pad", "crop"):
        _, tf = resize_image(img, 32, policy)
        cells, inside = sample_frame_grid(ramp, tf, (32, 32), "nearest")
        back, covered = sample_original(cells, tf, "nearest")
        assert covered.float().mean() > 0.7
        assert torch.allclose(back[0][covered], ramp[0][covered], atol=0.15), policy
        if policy == "pad":
            assert not inside.all() and covered.all()


# ---------------------------------------------------------------------------------------------- learning
def test_probe_learns_linear_depth_and_roundtrips(nyu, tmp_path):
    path, _, _ = nyu
    train, test = NYUv2Labeled(path, "train"), NYUv2Labeled(path, "test")
    spec = FeatureSpec(taps="f", size=32)
    cfg = ProbeTrainConfig(epochs=60, lr=0.1, batch_size=8)
    untrained = run_depth_probe(PoolExtractor(), train, test, spec, ProbeTrainConfig(epochs=1, lr=1e-9),
                                progress=False)
    result = run_depth_probe(PoolExtractor(), train, test, spec, cfg, progress=False,
                             save_path=tmp_path / "probe.safetensors")
    m = result.metrics
    assert m["rmse"] < 0.2 and m["abs_rel"] < 0.06 and m["delta1"] > 0.9, m
    assert untrained.metrics["rmse"] > 5 * m["rmse"]
    assert result.history[-1] < result.history[0]

    loaded = DepthProbe.from_file(result.weights_path)
    feats = torch.randn(2, 3, 4, 4)
    assert torch.allclose(loaded(feats), result.probe.cpu()(feats), atol=1e-6)


def test_feature_cache_skips_the_extractor(nyu, tmp_path):
    path, _, _ = nyu
    train, test = NYUv2Labeled(path, "train"), NYUv2Labeled(path, "test")
    spec, cfg = FeatureSpec(taps="f", size=32, batch_size=4), ProbeTrainConfig(epochs=2)
    first = PoolExtractor()
    a = run_depth_probe(first, train, test, spec, cfg, cache_dir=tmp_path / "cache", progress=False)
    assert first.calls == 3  # 8 train + 4 test images in batches of 4
    second = PoolExtractor()
    b = run_depth_probe(second, train, test, spec, cfg, cache_dir=tmp_path / "cache", progress=False)
    assert second.calls == 0
    assert a.metrics["rmse"] == pytest.approx(b.metrics["rmse"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- CLI
def _probe_parser():
    from cleandift.cli.eval_probes import add_probe_commands

    parser = argparse.ArgumentParser()
    add_probe_commands(parser.add_subparsers())
    return parser


def test_cli_depth_on_tiny_model(tmp_path, tiny_pipeline_dir):
    imgs, deps = _scenes(2)
    root = write_depth_folder(tmp_path / "data", imgs[:1], deps[:1], "train")
    write_depth_folder(root, imgs[1:], deps[1:], "test")
    out = tmp_path / "res" / "depth.json"
    args = _probe_parser().parse_args([
        "depth", "--root", str(root), "--model", str(tiny_pipeline_dir), "--device", "cpu", "--mode", "noisy",
        "--t", "299", "--taps", "us6", "--size", "64", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "depth" and result["mode"] == "noisy"
    assert math.isfinite(result["metrics"]["rmse"])
    assert result["extractor"]["describe"]["t"] == 299
    assert (tmp_path / "res" / "depth.probe.safetensors").is_file()


def test_cli_depth_missing_dataset_is_a_clear_error(tmp_path):
    args = _probe_parser().parse_args(["depth", "--root", str(tmp_path / "nowhere"), "--no-progress"])
    with pytest.raises(DatasetError, match="nowhere"):
        args.func(args)


def test_cli_through_main_when_eval_is_wired(tmp_path):
    from cleandift.cli.main import build_parser, main

    try:
        build_parser().parse_args(["eval", "depth", "--root", "x"])
    except SystemExit:
        pytest.skip("cli/eval.py does not register the probe commands yet")
    assert main(["eval", "depth", "--root", str(tmp_path / "nowhere"), "--no-progress"]) == 2
