"""VOC segmentation probe: reader (palette PNGs, 255 = ignore), mIoU, learning, nearest upsampling, CLI."""

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
from cleandift.eval.probe_common import FeatureSpec, ProbeTrainConfig
from cleandift.eval.segmentation import (
    IGNORE_INDEX, MeanIoU, SegmentationProbe, VOCSegmentation, read_voc_label, run_segmentation_probe, seg_target,
    voc_palette,
)
from cleandift.images import resize_image

H, W = 32, 40
PERSON = 15


class PoolExtractor:
    def __call__(self, images, prompts=None, taps=None):
        return {"f": F.avg_pool2d(images, 8)}


def _scene(rng) -> tuple[np.ndarray, np.ndarray]:
    """Four 8-row bands, bright red = person, dark red = background; the first row of each band is 255."""
    img = np.zeros((H, W, 3), np.uint8)
    label = np.zeros((H, W), np.uint8)
    for band in range(4):
        bright = rng.random() < 0.5
        rows = slice(band * 8, band * 8 + 8)
        img[rows, :, 0] = rng.integers(170, 256) if bright else rng.integers(0, 86)
        img[rows, :, 1] = rng.integers(0, 256, (8, W))
        label[rows] = PERSON if bright else 0
        label[band * 8] = IGNORE_INDEX
    return img, label


def write_voc(root, splits: dict[str, int], seed: int = 0):
    """``root/VOCdevkit/VOC2012`` with JPEGImages, palette SegmentationClass PNGs and split lists."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    k = 0
    for split, n in splits.items():
        names = []
        for _ in range(n):
            name = f"2007_{k:06d}"
            img, label = _scene(rng)
            Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=98)
            png = Image.fromarray(label, mode="P")
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{name}.png")
            names.append(name)
            k += 1
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return voc


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_voc(tmp_path_factory.mktemp("voc"), {"train": 10, "val": 4})


# ---------------------------------------------------------------------------------------------- reader
def test_reader_finds_root_and_reads_palette_labels(voc):
    for root in (voc, voc.parent, voc.parent.parent):
        assert len(VOCSegmentation(root, "train")) == 10
    s = VOCSegmentation(voc, "val")[0]
    assert s.image.size == (W, H) and s.label.shape == (H, W)
    assert set(np.unique(s.label)) <= {0, PERSON, IGNORE_INDEX}
    assert (s.label[[0, 8, 16, 24]] == IGNORE_INDEX).all()


def test_rgb_label_png_is_mapped_through_the_colour_map(tmp_path):
    label = np.array([[0, PERSON], [IGNORE_INDEX, 1]], np.uint8)
    Image.fromarray(voc_palette()[label]).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_voc_label(tmp_path / "rgb.png"), label)
    Image.fromarray(np.full((2, 2, 3), 7, np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(DatasetError, match="bad.png"):
        read_voc_label(tmp_path / "bad.png")


def test_reader_errors_name_the_file(tmp_path):
    voc = write_voc(tmp_path / "a", {"train": 2, "val": 1})
    (voc / "SegmentationClass" / "2007_000001.png").unlink()
    with pytest.raises(DatasetError, match="2007_000001.png"):
        VOCSegmentation(voc, "train")
    (voc / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(DatasetError, match="2007_000002.jpg"):
        VOCSegmentation(voc, "val")
    (voc / "ImageSets" / "Segmentation" / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty.txt"):
        VOCSegmentation(voc, "empty")
    with pytest.raises(DatasetError, match="trainaug.txt"):
        VOCSegmentation(voc, "trainaug")
    with pytest.raises(DatasetError, match="no VOC layout"):
        VOCSegmentation(tmp_path / "nothing", "train")


# ---------------------------------------------------------------------------------------------- metric
def test_miou_hand_computed_with_ignore_index():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])  # the last two pixels are ignored, whatever they say
    m = MeanIoU(num_classes=4)
    m.update(pred, target)
    out = m.compute()
    # class 0: TP 1, FP 1 (pixel 5), FN 1 (pixel 1) -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert out["iou_per_class"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert out["iou_per_class"][3] is None  # absent from targets and predictions: left out of the mean
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["pixel_accuracy"] == pytest.approx(4 / 6)
    assert out["num_pixels"] == 6
    m.update(torch.tensor([3]), torch.tensor([255]))  # ignored even though 3 never occurs in targets
    assert m.compute()["miou"] == pytest.approx(out["miou"])
    m.update(torch.tensor([3]), torch.tensor([0]))  # a false positive of class 3 makes its IoU 0
    assert m.compute()["iou_per_class"][3] == 0.0
    with pytest.raises(ValueError, match="target class 7"):
        m.update(torch.tensor([0]), torch.tensor([7]))


# ---------------------------------------------------------------------------------------------- learning
def test_target_sampling_and_nearest_upsampling_are_exact_on_aligned_bands(voc):
    sample = VOCSegmentation(voc, "train")[0]
    _, tf = resize_image(sample.image, 32, "stretch")
    cells = seg_target(sample, tf, (4, 4))
    assert cells.shape == (4, 4)
    rows = sample.label[4::8, 0]  # band centres (never the ignore row)
    assert torch.equal(cells[:, 0], torch.from_numpy(rows.astype(np.int64)))
    _, tf_pad = resize_image(sample.image, 32, "pad")
    assert (seg_target(sample, tf_pad, (8, 8))[0] == IGNORE_INDEX).all()  # top padding is ignored


def test_probe_learns_sign_of_a_channel(voc, tmp_path):
    train, val = VOCSegmentation(voc, "train"), VOCSegmentation(voc, "val")
    result = run_segmentation_probe(PoolExtractor(), train, val, FeatureSpec(taps="f", size=32),
                                    ProbeTrainConfig(epochs=40, lr=0.05, batch_size=4), progress=False,
                                    save_path=tmp_path / "seg.safetensors")
    assert result.metrics["miou"] > 0.95, result.metrics
    iou = result.metrics["iou_per_class"]
    assert iou[0] > 0.95 and iou[PERSON] > 0.95 and iou[1] is None
    loaded = SegmentationProbe.from_file(result.weights_path)
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(loaded(x), result.probe.cpu()(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------- CLI
def _probe_parser():
    from cleandift.cli.eval_probes import add_probe_commands

    parser = argparse.ArgumentParser()
    add_probe_commands(parser.add_subparsers())
    return parser


def test_cli_seg_on_tiny_model(tmp_path, tiny_pipeline_dir):
    voc = write_voc(tmp_path / "data", {"train": 1, "val": 1})
    out = tmp_path / "seg.json"
    args = _probe_parser().parse_args([
        "seg", "--root", str(voc.parent), "--model", str(tiny_pipeline_dir), "--device", "cpu", "--mode", "naive",
        "--t", "100", "--size", "64", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "seg" and result["mode"] == "naive-clean" and result["requested_mode"] == "naive"
    assert 0.0 <= result["metrics"]["miou"] <= 1.0 and not math.isnan(result["metrics"]["miou"])
    assert result["extractor"]["describe"]["timestep"] == 100.0
    assert (tmp_path / "seg.probe.safetensors").is_file()


def test_cli_seg_missing_split_file(tmp_path):
    voc = write_voc(tmp_path / "data", {"train": 1})
    args = _probe_parser().parse_args(["seg", "--root", str(voc), "--no-progress"])
    with pytest.raises(DatasetError, match="val.txt"):
        args.func(args)
