"""DiT feature clean-ups (off by default): the AdaLN readout and massive-activation suppression."""

from __future__ import annotations

import pytest
import torch

from cleandift import CleanExtractor, NoisyExtractor, load_backbone
from cleandift.dit_cleanup import suppress_massive_activations
from cleandift.taps import tokens_to_map
from cleandift.testing import tiny_flux, tiny_pixart, tiny_sd3


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return load_backbone(str(tiny_flux.save(tmp_path_factory.mktemp("flux"))))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return load_backbone(str(tiny_sd3.save(tmp_path_factory.mktemp("sd3"))))


def test_massive_channels_are_found_per_image_and_zeroed():
    feat = torch.ones(2, 6, 3, 3)
    feat[0, 4] = 500.0  # image 0: channel 4 is massive
    feat[1, 1] = -900.0  # image 1: channel 1 (sign does not matter)
    out, mask = suppress_massive_activations(feat, ratio=100)
    assert mask.tolist() == [[False] * 4 + [True, False], [False, True] + [False] * 4]
    assert out[0, 4].abs().sum() == 0 and out[1, 1].abs().sum() == 0
    assert torch.equal(out[0, :4], feat[0, :4]) and torch.equal(out[1, 2:], feat[1, 2:])
    alone, _ = suppress_massive_activations(feat[1:], ratio=100)
    assert torch.equal(alone, out[1:])  # never depends on the other images
    assert suppress_massive_activations(feat, ratio=1000)[1].sum() == 0
    with pytest.raises(ValueError, match="> 1"):
        suppress_massive_activations(feat, ratio=0.5)


def _temb_and_residual(backbone, x, t, cond):
    """Residual block outputs (all taps) and the timestep embedding, from one plain forward."""
    seen = {}
    hook = backbone.denoiser.time_text_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("temb", o))
    try:
        residual = backbone.run_taps(x, t, cond, backbone.taps.select("all"))
    finally:
        hook.remove()
    return residual, seen["temb"]


def test_flux_adaln_readout_is_the_next_norm_applied_to_the_block_output(flux):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([300.0]), flux.encode_prompts("a cat", 1)
    residual, temb = _temb_and_residual(flux, x, t, cond)
    taps = flux.taps.select("all")  # block0, block1 (double), block2, block3 (single)
    adaln = flux.run_taps(x, t, cond, flux.readout_taps(taps, "adaln"))
    model = flux.denoiser

    def tokens(name):
        return residual[name].flatten(2).transpose(1, 2)

    expected = {
        "block0": model.transformer_blocks[1].norm1(tokens("block0"), emb=temb)[0],
        "block1": model.single_transformer_blocks[0].norm(tokens("block1"), emb=temb)[0],
        "block2": model.single_transformer_blocks[1].norm(tokens("block2"), emb=temb)[0],
        "block3": model.norm_out(tokens("block3"), temb),
    }
    for name, tok in expected.items():
        torch.testing.assert_close(adaln[name], tokens_to_map(tok, (4, 4)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adaln["block1"], residual["block1"])


def test_sd3_adaln_readout_and_extractor_options(sd3):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain = NoisyExtractor(sd3, t=200, ensemble=1, taps="block1")(images, generator=torch.Generator().manual_seed(0))
    adaln = NoisyExtractor(sd3, t=200, ensemble=1, taps="block1", readout="adaln")(
        images, generator=torch.Generator().manual_seed(0))
    assert plain["block1"].shape == adaln["block1"].shape and not torch.allclose(plain["block1"], adaln["block1"])
    assert sd3.readout_taps(sd3.taps.select("block1"), "adaln")[0].module == "transformer_blocks.2.norm1"
    last = sd3.taps.names[-1]
    assert sd3.readout_taps(sd3.taps.select(last), "adaln")[0].module == "norm_out"
    clean = CleanExtractor(sd3, timestep=0, taps="block1")(images)["block1"]
    cleaned = CleanExtractor(sd3, timestep=0, taps="block1", massive_ratio=1.5)(images)["block1"]
    torch.testing.assert_close(cleaned, suppress_massive_activations(clean, 1.5)[0])
    assert CleanExtractor(sd3, readout="adaln", massive_ratio=3.0).describe()["readout"] == "adaln"


def test_families_without_a_modulated_norm_module_refuse_the_adaln_readout(tmp_path, tiny_backbone):
    pixart = load_backbone(str(tiny_pixart.save(tmp_path / "pixart")))
    for backbone in (pixart, tiny_backbone):
        with pytest.raises(ValueError, match="has no AdaLN readout"):
            CleanExtractor(backbone, readout="adaln")
    with pytest.raises(ValueError, match="readout must be one of residual, adaln"):
        CleanExtractor(tiny_backbone, readout="raw")
