"""kNN classification: ImageFolder reader, cosine kNN with ties and temperature weighting, top-1, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cleandift.errors import DatasetError
from cleandift.eval.knn import ImageFolderDataset, KNNAccuracy, KNNConfig, knn_predict, run_knn
from cleandift.eval.probe_common import FeatureSpec

COLOURS = {"apple": (200, 30, 30), "sky": (30, 60, 210), "grass": (40, 190, 50)}


class PoolExtractor:
    def __call__(self, images, prompts=None, taps=None):
        return {"f": F.avg_pool2d(images, 8)}


def write_image_folder(root, per_class: dict[str, int], classes=COLOURS, seed: int = 0):
    """``root/<split>/<class>/<n>.jpg``: noisy images of a class colour (linearly separable when pooled)."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for cls, colour in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(colour) + rng.normal(0, 25, (24, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i:03d}.jpg", quality=95)
    return root


# ---------------------------------------------------------------------------------------------- reader
def test_image_folder_reader(tmp_path):
    root = write_image_folder(tmp_path, {"train": 2, "val": 1})
    train = ImageFolderDataset(root, "train")
    assert train.classes == ["apple", "grass", "sky"]
    assert len(train) == 6 and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    s = train[3]
    assert s.name == "grass/001.jpg" and s.label == 1 and s.image.size == (32, 24)
    val = ImageFolderDataset(root, "val", classes=["sky", "apple", "grass"])
    assert sorted(val.labels.tolist()) == [0, 1, 2] and val[0].label == 1  # apple is class 1 here


def test_image_folder_errors_name_the_folder(tmp_path):
    root = write_image_folder(tmp_path, {"train": 1})
    with pytest.raises(DatasetError, match="val"):
        ImageFolderDataset(root, "val")
    (root / "val" / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "val" / "zebra" / "a.png")
    with pytest.raises(DatasetError, match="zebra"):
        ImageFolderDataset(root, "val", classes=ImageFolderDataset(root, "train").classes)
    (root / "empty" / "apple").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderDataset(root, "empty")


# ---------------------------------------------------------------------------------------------- classifier
def _unit(*angles_deg: float) -> torch.Tensor:
    a = torch.tensor(angles_deg) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_knn_majority_vote_hand_computed():
    train = _unit(0, 10, 20, 90, 100)
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = _unit(5, 95)
    # query 5 deg: neighbours 0 (0), 10 (0), 20 (1) -> 0; query 95: 90, 100, 20 -> 1
    assert knn_predict(train, labels, query, k=3).tolist() == [0, 1]
    # cosine: scaling any vector changes nothing
    scaled = train * torch.tensor([[100.0], [1], [3], [0.1], [7]])
    assert knn_predict(scaled, labels, query * 5, k=3).tolist() == [0, 1]
    assert knn_predict(train, labels, query, k=50).tolist() == [1, 1]  # k clamped to N=5: 3 votes vs 2


def test_knn_ties_go_to_the_class_of_the_nearest_neighbour():
    train = _unit(0, 10, 30, 40)
    labels = torch.tensor([1, 0, 0, 1])
    # query at 12 deg: ranks 10 (0), 0 (1) -> 1:1 tie, nearest is class 0
    assert knn_predict(train, labels, _unit(12), k=2).tolist() == [0]
    # query at 2 deg: ranks 0 (1), 10 (0), 30 (0), 40 (1) -> 2:2 tie, nearest is class 1 (not the lower index)
    assert knn_predict(train, labels, _unit(2), k=4).tolist() == [1]
    # exact similarity ties are ranked by training index: duplicates of one vector, k=1 picks the first
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert knn_predict(dup, torch.tensor([2, 1]), torch.tensor([[1.0, 0.0]]), k=1, num_classes=3).tolist() == [2]


def test_temperature_weighting_favours_close_neighbours():
    train = _unit(0, 80, 85)
    labels = torch.tensor([0, 1, 1])
    query = _unit(1)
    assert knn_predict(train, labels, query, k=3).tolist() == [1]  # majority: 2 votes to 1
    assert knn_predict(train, labels, query, k=3, weighting="temperature", temperature=0.07).tolist() == [0]
    with pytest.raises(ValueError, match="weighting"):
        knn_predict(train, labels, query, weighting="distance")


def test_knn_accuracy_metric():
    m = KNNAccuracy()
    m.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    m.update(torch.tensor([3]), torch.tensor([3]))
    assert m.compute() == {"top1": 0.75, "num_samples": 4}
    m.reset()
    with pytest.raises(ValueError):
        m.compute()


def test_knn_on_separable_pooled_features(tmp_path):
    root = write_image_folder(tmp_path, {"train": 4, "val": 3})
    train = ImageFolderDataset(root, "train")
    val = ImageFolderDataset(root, "val", classes=train.classes)
    for weighting in ("majority", "temperature"):
        result = run_knn(PoolExtractor(), train, val, FeatureSpec(taps="f", size=32),
                         KNNConfig(k=10, weighting=weighting), progress=False)
        assert result.metrics == {"top1": 1.0, "num_samples": 9}
    result = run_knn(PoolExtractor(), train, val, FeatureSpec(taps="f", size=32), KNNConfig(k=1),
                     cache_dir=tmp_path / "cache", progress=False)
    assert result.metrics["top1"] == 1.0 and any((tmp_path / "cache").rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- CLI
def _probe_parser():
    from cleandift.cli.eval_probes import add_probe_commands

    parser = argparse.ArgumentParser()
    add_probe_commands(parser.add_subparsers())
    return parser


def test_cli_knn_on_tiny_model(tmp_path, tiny_pipeline_dir):
    root = write_image_folder(tmp_path / "data", {"train": 1, "val": 1}, classes=dict(list(COLOURS.items())[:2]))
    out = tmp_path / "knn.json"
    args = _probe_parser().parse_args([
        "knn", "--root", str(root), "--model", str(tiny_pipeline_dir), "--device", "cpu", "--mode", "clean",
        "--taps", "mid,us6", "--size", "64", "--k", "1", "--readout", "avg+max", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "knn" and result["metrics"]["num_samples"] == 2
    assert 0.0 <= result["metrics"]["top1"] <= 1.0
    assert result["config"]["knn"]["k"] == 1 and result["config"]["pool"] == "avg+max"


def test_cli_knn_empty_split_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 1})
    (root / "val").mkdir()
    args = _probe_parser().parse_args(["knn", "--root", str(root), "--no-progress"])
    with pytest.raises(DatasetError, match="no images"):
        args.func(args)


def test_knn_readout_option_reaches_the_features(tmp_path):
    """``grid2`` keeps 4x the dimensions of ``avg``; an unknown readout fails when the config is built."""
    from cleandift.eval.knn import pooled_features

    root = write_image_folder(tmp_path, {"train": 1})
    train = ImageFolderDataset(root, "train")
    spec = FeatureSpec(taps="f", size=32)
    avg, _ = pooled_features(PoolExtractor(), train, spec, progress=False)
    grid, _ = pooled_features(PoolExtractor(), train, spec, progress=False, readout="grid2")
    assert avg.shape == (3, 3) and grid.shape == (3, 12)
    assert torch.allclose(grid.view(3, 3, 4).mean(-1), avg, atol=1e-5)  # the quadrant means average to the mean
    result = run_knn(PoolExtractor(), train, train, spec, KNNConfig(k=1, readout="max"), progress=False)
    assert result.metrics["top1"] == 1.0 and result.config["pool"] == "max"
    with pytest.raises(ValueError, match="unknown kNN readout"):
        KNNConfig(readout="median")
