"""``cleandift extract`` and ``cleandift env`` end to end on the tiny model folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift.cli.main import main
from cleandift.feature_files import load_features


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).convert("L").save(folder / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA").save(folder / "c.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "broken.jpg").write_text("not an image")
    Image.new("RGB", (5, 5)).save(folder / "tiny.png")
    return folder


def test_extract_folder_clean(tiny_pipeline_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "feats.safetensors"
    code = main(["extract", str(image_folder), "--model", str(tiny_pipeline_dir), "--out", str(out),
                 "--taps", "mid,us6", "--batch-size", "2"])
    assert code == 0
    feats, meta = load_features(out)
    assert sorted(feats) == ["a.png", "c.png", "sub/b.jpg"]
    assert feats["a.png"]["us6"].shape == (64, 8, 8) and feats["a.png"]["us6"].dtype == torch.float16
    assert meta["images"]["a.png"]["size"] == [120, 90]
    assert meta["settings"]["mode"] == "clean" and meta["settings"]["taps"] == ["mid", "us6"]
    printed = capsys.readouterr().out
    assert "skipped 3 unreadable image(s)" in printed
    for name in ("empty.png", "broken.jpg", "tiny.png"):
        assert name in printed


def test_extract_noisy_is_reproducible(tiny_pipeline_dir, image_folder, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"n{i}.safetensors"
        assert main(["extract", str(image_folder / "a.png"), "--model", str(tiny_pipeline_dir), "--out", str(out),
                     "--mode", "noisy", "--t", "300", "--ensemble", "2", "--seed", "3", "--save-dtype", "fp32",
                     "--size", "64", "--resize", "pad", "--prompt", "a photo of a {stem}"]) == 0
        outs.append(load_features(out))
    (f0, meta), (f1, _) = outs
    torch.testing.assert_close(f0["a.png"]["us6"], f1["a.png"]["us6"], rtol=0, atol=0)
    assert f0["a.png"]["us6"].shape == (64, 4, 4)
    assert meta["settings"]["t"] == 300 and meta["settings"]["ensemble"] == 2
    assert meta["images"]["a.png"]["prompt"] == "a photo of a a"
    assert meta["images"]["a.png"]["transform"]["policy"] == "pad"


def test_extract_strict_fails_on_bad_file(tiny_pipeline_dir, image_folder, tmp_path, capsys):
    code = main(["extract", str(image_folder / "empty.png"), str(image_folder / "a.png"), "--model",
                 str(tiny_pipeline_dir), "--out", str(tmp_path / "x.safetensors"), "--strict"])
    assert code == 2
    assert "empty.png: file is empty" in capsys.readouterr().err


def test_extract_unknown_tap_and_bad_t(tiny_pipeline_dir, image_folder, tmp_path, capsys):
    args = [str(image_folder / "a.png"), "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "x.safetensors")]
    assert main(["extract", *args, "--taps", "us42"]) == 2
    assert "unknown tap(s) 'us42'" in capsys.readouterr().err
    assert main(["extract", *args, "--mode", "noisy", "--t", "1000"]) == 2
    assert "t=1000 is outside [0, 999]" in capsys.readouterr().err


def test_extract_with_checkpoint(tiny_backbone, tiny_pipeline_dir, image_folder, tmp_path):
    from safetensors.torch import save_file

    state = {f"unet_feature_extractor_cleandift.{k}": v + 0.01 for k, v in tiny_backbone.unet.state_dict().items()}
    state["timestep"] = torch.tensor(240.0)
    ckpt = tmp_path / "cleandift_full.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    out = tmp_path / "s.safetensors"
    assert main(["extract", str(image_folder / "a.png"), "--model", str(tiny_pipeline_dir), "--checkpoint", str(ckpt),
                 "--out", str(out)]) == 0
    _, meta = load_features(out)
    assert meta["settings"]["timestep"] == 240.0


def test_extract_no_images(tmp_path, capsys):
    assert main(["extract", str(tmp_path / "*.jpg"), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_env_runs(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "sd15" in out and "sd21" in out


def test_extract_writes_pca_png(tiny_pipeline_dir, image_folder, tmp_path):
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(image_folder / "a.png"), "--model", str(tiny_pipeline_dir), "--out", str(out),
                 "--taps", "us6,us9", "--pca", "us9"]) == 0
    png = tmp_path / "f_pca" / "a.png.us9.png"
    assert Image.open(png).size == (120, 90)  # the original image size


@pytest.mark.slow
def test_extract_splits_images_across_processes(tiny_pipeline_dir, image_folder, tmp_path):
    """Under a distributed launcher each process extracts its share; the parts are merged into --out."""
    import subprocess
    import sys

    out = tmp_path / "mp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cleandift.cli.main",
           "extract", str(image_folder), "--model", str(tiny_pipeline_dir), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    feats, meta = load_features(out)
    assert sorted(feats) == ["a.png", "c.png", "sub/b.jpg"]
    assert sorted(p for p, _ in meta["failed"]) == sorted(str(image_folder / n) for n in ("broken.jpg", "empty.png",
                                                                                         "tiny.png"))
    assert not list(tmp_path.glob("mp.part*"))
