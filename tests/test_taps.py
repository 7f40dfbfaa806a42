"""The tap table and the early-stopping hooks."""

from __future__ import annotations

import pytest
import torch

from cleandift.backbones.random_init import build_unet
from cleandift.errors import UnknownTapError
from cleandift.taps import REFERENCE_TAPS, discover_taps, run_to_taps

# (module, channel-level index into block_out_channels, stride relative to the latent) per the reference table
SD_TABLE = {
    "mid": ("mid_block", 3, 8),
    "us1": ("up_blocks.0.resnets.0", 3, 8),
    "us2": ("up_blocks.0.resnets.1", 3, 8),
    "us3": ("up_blocks.0.upsamplers.0", 3, 4),
    "us4": ("up_blocks.1.attentions.0", 2, 4),
    "us5": ("up_blocks.1.attentions.1", 2, 4),
    "us6": ("up_blocks.1.upsamplers.0", 2, 2),
    "us7": ("up_blocks.2.attentions.0", 1, 2),
    "us8": ("up_blocks.2.attentions.1", 1, 2),
    "us9": ("up_blocks.2.upsamplers.0", 1, 1),
    "us10": ("up_blocks.3.attentions.0", 0, 1),
}


@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sd21"])
def test_tap_table_matches_reference(arch):
    unet = build_unet(arch)
    taps = discover_taps(unet)
    assert taps.default == REFERENCE_TAPS
    channels = unet.config.block_out_channels
    for name, (module, level, stride) in SD_TABLE.items():
        tap = taps[name]
        assert tap.module == module
        assert tap.channels == channels[level]
        assert tap.stride == stride
    # the two final decoder layers exist but are not in the default set ("except the two final blocks")
    assert taps.names[-2:] == ("us11", "us12")


@pytest.mark.slow
def test_tap_table_at_real_sd15_size():
    """Real SD1.5 channel counts (1280 x7, 640 x3, 320) and strides; built from config, ~10 s."""
    unet = build_unet("sd15")
    taps = discover_taps(unet)
    assert [taps[n].channels for n in REFERENCE_TAPS] == [1280] * 7 + [640] * 3 + [320]
    assert [64 // taps[n].stride for n in REFERENCE_TAPS] == [8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64]


@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sd21"])
def test_feature_shapes_follow_table(arch, tiny_backbone, tiny_sd21_backbone):
    backbone = tiny_backbone if arch == "tiny-sd15" else tiny_sd21_backbone
    taps = backbone.taps.select("all")
    latent = torch.randn(2, 4, 16, 16)
    cond = backbone.encode_prompts(None, 2)
    feats = run_to_taps(backbone.unet, latent, 261, cond, taps)
    for tap in taps:
        assert feats[tap.name].shape == (2, tap.channels, 16 // tap.stride, 16 // tap.stride)
        assert torch.isfinite(feats[tap.name]).all()


def test_early_exit_equals_full_forward(tiny_backbone):
    unet = tiny_backbone.unet
    taps = tiny_backbone.taps.select("all")
    latent = torch.randn(1, 4, 16, 16)
    cond = tiny_backbone.encode_prompts("a cat", 1)
    full = run_to_taps(unet, latent, 500, cond, taps, stop_early=False)
    for tap in taps:
        early = run_to_taps(unet, latent, 500, cond, [tap], stop_early=True)
        torch.testing.assert_close(early[tap.name], full[tap.name], rtol=0, atol=0)


def test_early_exit_skips_later_modules(tiny_backbone):
    unet = tiny_backbone.unet
    called = []
    handles = [unet.get_submodule(m).register_forward_hook(lambda *a, m=m: called.append(m))
               for m in ("up_blocks.1.upsamplers.0", "up_blocks.2.resnets.0", "conv_out")]
    try:
        run_to_taps(unet, torch.randn(1, 4, 16, 16), 10, tiny_backbone.encode_prompts(None, 1),
                    tiny_backbone.taps.select(["us6"]))
    finally:
        for h in handles:
            h.remove()
    assert called == ["up_blocks.1.upsamplers.0"]


def test_hooks_are_removed(tiny_backbone):
    unet = tiny_backbone.unet
    before = sum(len(m._forward_hooks) for m in unet.modules())
    run_to_taps(unet, torch.randn(1, 4, 16, 16), 10, tiny_backbone.encode_prompts(None, 1),
                tiny_backbone.taps.select(["mid", "us10"]))
    assert sum(len(m._forward_hooks) for m in unet.modules()) == before


def test_gradients_flow_through_partial_graph(tiny_backbone):
    import copy

    unet = copy.deepcopy(tiny_backbone.unet).requires_grad_(True)
    feats = run_to_taps(unet, torch.randn(1, 4, 16, 16), 261.0, tiny_backbone.encode_prompts(None, 1),
                        tiny_backbone.taps.select(["us6"]))
    feats["us6"].square().mean().backward()
    assert unet.get_submodule("up_blocks.1.upsamplers.0.conv").weight.grad is not None
    assert unet.get_submodule("up_blocks.2.resnets.0.conv1").weight.grad is None  # never ran


@pytest.mark.parametrize("request_", ["us99", "mid,bogus", ["us1", "up_blocks.1"]])
def test_unknown_taps_are_named(tiny_backbone, request_):
    with pytest.raises(UnknownTapError, match="this U-Net has: mid, us1"):
        tiny_backbone.taps.select(request_)


def test_tap_selection_grammar(tiny_backbone):
    taps = tiny_backbone.taps
    assert [t.name for t in taps.select("us6, mid")] == ["mid", "us6"]  # execution order
    assert [t.name for t in taps.select(None)] == list(REFERENCE_TAPS)
    assert len(taps.select("all")) == 13
