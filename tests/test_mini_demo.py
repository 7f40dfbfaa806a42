"""The offline demo on a pixel-space model (a tiny random one here; CI has no shipped weights to spare)."""

import json

import pytest
from PIL import Image

from cleandift.backbones.loading import load_backbone
from cleandift.backbones.pixel import PixelDiffusionBackbone, build_pixel_backbone, mini_unet_config
from cleandift.cli.main import main
from cleandift.pretrain.idx import BUNDLED_SUBSET_DIR, BUNDLED_SUBSET_SIZES, load_idx_dataset

TINY = dict(block_out_channels=(8, 16, 16, 24), cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixel") / "model"
    build_pixel_backbone(mini_unet_config(**TINY), seed=0).save(folder)
    return folder


def test_bundled_subset_is_class_balanced_and_licensed():
    for split, per_class in BUNDLED_SUBSET_SIZES.items():
        images, labels = load_idx_dataset(BUNDLED_SUBSET_DIR, split)
        assert images.shape[1:] == (28, 28)
        assert labels.bincount().tolist() == [per_class] * 10
    assert "MIT" in (BUNDLED_SUBSET_DIR / "README.md").read_text()


def test_load_backbone_recognises_pixel_folders(pixel_folder):
    backbone = load_backbone(str(pixel_folder))
    assert isinstance(backbone, PixelDiffusionBackbone)
    assert backbone.resolution == 32


@pytest.mark.slow
def test_demo_on_a_pixel_model_writes_report(pixel_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", str(pixel_folder), "--distill-steps", "3",
                 "--bank", "200", "--queries", "40"]) == 0
    printed = capsys.readouterr().out
    assert "alignment loss" in printed and str((out / "report.html").resolve()) in printed
    results = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in results["table"]]
    assert methods[0].startswith("raw pixels") and any(m.startswith("CleanDIFT") for m in methods)
    assert len(results["distillation"]) == 3
    for row in results["table"]:
        assert 0.0 <= row["knn"] <= 1.0 and 0.0 <= row["pck10"] <= 1.0 and row["pck05"] <= row["pck10"]
    page = (out / "report.html").read_text()
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) >= 10
    for png in pngs:
        assert f'src="figures/{png.name}"' in page
        with Image.open(png) as img:
            assert img.size[0] > 0
    # no shipped student for this model: the report says the row is the demo's own short run
    assert "is the demo's own 3-step distillation" in page and "validation set" in page
    assert results["protocol"]["tap_selection"].startswith("best tap per method") and results["student"] == "demo run"
    # a second run in the same folder just works, and leaves only its own figures
    assert main(["demo", "--out", str(out), "--model", str(pixel_folder), "--distill-steps", "2",
                 "--bank", "200", "--queries", "40"]) == 0
    assert len(json.loads((out / "results.json").read_text())["distillation"]) == 2
    page = (out / "report.html").read_text()
    assert all(f'src="figures/{png.name}"' in page for png in (out / "figures").glob("*.png"))
