"""``cleandift extract`` on every family's tiny pipeline folder: default taps, --sigma, what the file records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift import NoisyExtractor, load_backbone
from cleandift.cli.main import main
from cleandift.feature_files import load_features
from cleandift.testing import tiny_flux, tiny_pixart, tiny_sd3, tiny_sdxl

BUILDERS = {"sdxl": tiny_sdxl, "sd3": tiny_sd3, "pixart": tiny_pixart, "flux": tiny_flux}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: builder.save(tmp_path_factory.mktemp(name)) for name, builder in BUILDERS.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "b.png")
    return folder


@pytest.mark.parametrize("family", list(BUILDERS))
def test_extract_records_family_default_tap_and_noise(family, folders, images, tmp_path):
    out = tmp_path / "f.safetensors"
    code = main(["extract", str(images), "--model", str(folders[family]), "--mode", "noisy", "--t", "261",
                 "--ensemble", "2", "--size", "32", "--out", str(out)])
    assert code == 0
    feats, meta = load_features(out)
    backbone = load_backbone(str(folders[family]))
    settings = meta["settings"]
    assert settings["family"] == family and settings["taps"] == list(backbone.default_feature_taps)
    assert settings["noise_process"] == backbone.noise.kind and settings["t"] == 261
    latent = torch.empty(1, 1, 32 // backbone.latent_factor, 32 // backbone.latent_factor)
    assert settings["sigma_at_size"] == pytest.approx(backbone.sigma(261, latent))
    tap = backbone.taps[backbone.default_feature_taps[0]]
    side = 32 // backbone.latent_factor // tap.stride
    assert feats["a.png"][tap.name].shape == (tap.channels, side, side)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sigma_gives_that_noise_level_on_flow_models(family, folders, images, tmp_path):
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(images), "--model", str(folders[family]), "--mode", "noisy", "--sigma", "0.6",
                 "--ensemble", "1", "--size", "32", "--out", str(out)]) == 0
    _, meta = load_features(out)
    assert meta["settings"]["sigma"] == 0.6 and meta["settings"]["sigma_at_size"] == pytest.approx(0.6, abs=1e-6)
    backbone = load_backbone(str(folders[family]))
    t = NoisyExtractor(backbone, sigma=0.6, ensemble=1).t
    assert not float(t).is_integer()  # a flow model's t is continuous: no rounding to a whole number
    latent = torch.empty(1, 1, 16, 16)
    assert backbone.sigma(backbone.noise.timestep_for_sigma(0.25, seq_len=backbone.token_count(latent)),
                          latent) == pytest.approx(0.25, abs=1e-6)


def test_sigma_on_a_ddpm_model_is_the_nearest_timestep(folders):
    backbone = load_backbone(str(folders["sdxl"]))
    t = NoisyExtractor(backbone, sigma=0.5, ensemble=1).t
    table = (1 - backbone.scheduler.alphas_cumprod).sqrt()
    assert t == int((table - 0.5).abs().argmin()) and isinstance(t, int)


@pytest.mark.parametrize("argv, message", [
    (["--sigma", "0.5"], "--sigma sets the noise level of --mode noisy"),
    (["--mode", "noisy", "--sigma", "0.5", "--t", "100"], "pass one of them"),
    (["--mode", "noisy", "--sigma", "1.5"], "--sigma 1.5: must be in [0, 1)"),
])
def test_bad_sigma_is_one_line_before_loading(argv, message, images, tmp_path, capsys):
    code = main(["extract", str(images), "--model", str(tmp_path / "never-loaded"), *argv,
                 "--out", str(tmp_path / "f.safetensors")])
    assert code == 2 and message in capsys.readouterr().err


def test_dit_cleanup_flags_reach_the_feature_file(folders, images, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(images), "--model", str(folders["flux"]), "--dit-readout", "adaln",
                 "--massive-ratio", "50", "--t", "0", "--size", "32", "--out", str(out)]) == 0
    settings = load_features(out)[1]["settings"]
    assert settings["readout"] == "adaln" and settings["massive_ratio"] == 50
    code = main(["extract", str(images), "--model", str(folders["pixart"]), "--dit-readout", "adaln",
                 "--out", str(tmp_path / "g.safetensors")])
    assert code == 2 and "has no AdaLN readout" in capsys.readouterr().err
    code = main(["extract", str(images), "--model", str(folders["flux"]), "--massive-ratio", "0.5",
                 "--out", str(tmp_path / "h.safetensors")])
    assert code == 2 and "--massive-ratio 0.5: must be a number > 1" in capsys.readouterr().err


def test_offload_flag_extracts_like_a_plain_load(folders, images, tmp_path):
    outs = []
    for extra in ([], ["--offload"]):
        out = tmp_path / f"f{len(extra)}.safetensors"
        assert main(["extract", str(images), "--model", str(folders["sd3"]), "--size", "32", "--device", "cpu",
                     "--out", str(out), "--save-dtype", "fp32", *extra]) == 0
        outs.append(load_features(out)[0])
    for key in outs[0]:
        for tap in outs[0][key]:
            torch.testing.assert_close(outs[1][key][tap], outs[0][key][tap], rtol=0, atol=1e-6)
