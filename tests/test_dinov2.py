"""DINOv2 loading and the SD-DINO / TLFR feature protocol, on a tiny model saved to disk (no download)."""

from __future__ import annotations

import pytest
import torch

from cleandift.errors import BackboneNotFoundError
from cleandift.eval.dinov2 import IMAGENET_MEAN, IMAGENET_STD, Dinov2Features, load_dinov2

PATCH = 14


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                       patch_size=PATCH, image_size=56)
    folder = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def reference(dino_dir):
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(str(dino_dir), local_files_only=True).eval()


def _images(n: int = 2, side: int = 56) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _pixels(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def _grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def test_loads_from_saved_folder_and_returns_patch_grid(dino_dir):
    dino = load_dinov2(str(dino_dir), image_size=56, layer=2, local_files_only=True)
    out = dino(_images())
    assert out.shape == (2, 32, 4, 4) and out.dtype == torch.float32
    assert dino.grid_size() == (4, 4) and dino.channels == 32
    info = dino.describe()
    assert info["dino_layer"] == 2 and info["dino_facet"] == "token" and info["dino_image_size"] == 56


@pytest.mark.parametrize("layer", [0, 1, 2, -1])
def test_layer_k_is_hidden_states_k_plus_1(dino_dir, reference, layer):
    """Pins the numbering: SD-DINO's block ``k`` (0-based) == transformers ``hidden_states[k + 1]``."""
    dino = load_dinov2(str(dino_dir), image_size=56, layer=layer, local_files_only=True)
    images = _images()
    with torch.no_grad():
        hidden = reference(pixel_values=_pixels(images), output_hidden_states=True).hidden_states
    expected = _grid(hidden[(layer % 3) + 1], 4, 4)
    torch.testing.assert_close(dino(images), expected, rtol=1e-5, atol=1e-5)


def test_final_norm_matches_last_hidden_state(dino_dir, reference):
    dino = load_dinov2(str(dino_dir), image_size=56, layer=-1, final_norm=True, local_files_only=True)
    images = _images()
    with torch.no_grad():
        expected = _grid(reference(pixel_values=_pixels(images)).last_hidden_state, 4, 4)
    torch.testing.assert_close(dino(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("facet,proj", [("key", "k_proj"), ("query", "q_proj"), ("value", "v_proj")])
def test_attention_facets(dino_dir, reference, facet, proj):
    dino = load_dinov2(str(dino_dir), image_size=56, layer=1, facet=facet, local_files_only=True)
    images = _images()
    with torch.no_grad():
        hidden = reference(pixel_values=_pixels(images), output_hidden_states=True).hidden_states[1]
        block = reference.encoder.layer[1]
        expected = _grid(getattr(block.attention, proj)(block.norm1(hidden)), 4, 4)
    torch.testing.assert_close(dino(images), expected, rtol=1e-5, atol=1e-5)


def test_imagenet_normalisation_and_resize(dino_dir):
    dino = load_dinov2(str(dino_dir), image_size=56, layer=-1, local_files_only=True)
    black = -torch.ones(1, 3, 100, 100)
    pixels = dino.preprocess(black)
    assert pixels.shape == (1, 3, 56, 56)
    expected = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1).expand_as(pixels)
    torch.testing.assert_close(pixels, expected)
    assert dino(_images(1, 100)).shape == (1, 32, 4, 4)  # any input size -> the configured grid


def test_keep_input_size(dino_dir):
    dino = load_dinov2(str(dino_dir), image_size=None, layer=-1, local_files_only=True)
    out = dino(torch.zeros(1, 3, 70, 84))
    assert out.shape == (1, 32, 5, 6)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dino(torch.zeros(1, 3, 71, 84))


def test_dtype_and_device_from_caller(dino_dir):
    dino = load_dinov2(str(dino_dir), image_size=56, layer=-1, dtype=torch.bfloat16, device="cpu",
                       local_files_only=True)
    assert dino.dtype == torch.bfloat16 and dino.device.type == "cpu"
    out = dino(_images(1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_arguments(dino_dir, reference, tmp_path):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Dinov2Features(reference, image_size=50)
    with pytest.raises(ValueError, match="facet"):
        Dinov2Features(reference, image_size=56, facet="attn")
    with pytest.raises(ValueError, match="out of range"):
        Dinov2Features(reference, image_size=56, layer=3)
    with pytest.raises(BackboneNotFoundError, match="save_pretrained"):
        load_dinov2(str(tmp_path / "missing"), local_files_only=True)
