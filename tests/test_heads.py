"""Projection heads: reference layout, identity at init, FiLM / gating variants, loading and inference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cleandift.errors import CheckpointMismatchError, ConfigError
from cleandift.heads import (
    FiLMNorm,
    FourierFeatures,
    HeadConfig,
    LinearSwiGLU,
    ProjectionHeads,
    heads_from_state,
    infer_head_config,
    load_heads,
    project_features,
    rms_norm,
)

SD_CHANNELS = {"mid": 1280, **{f"us{i}": 1280 for i in range(1, 7)}, "us7": 640, "us8": 640, "us9": 640, "us10": 320}


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_reference_key_layout_and_shapes():
    heads = ProjectionHeads({"us6": 1280, "us10": 320})
    shapes = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    expected = {
        "time_emb.weight": (128, 1),
        "time_in_proj.weight": (256, 256),
        "mapping.in_norm.scale": (256,),
        "mapping.out_norm.scale": (256,),
    }
    for b in range(2):
        expected[f"mapping.blocks.{b}.norm.scale"] = (256,)
        expected[f"mapping.blocks.{b}.up_proj.weight"] = (2 * 768, 256)
        expected[f"mapping.blocks.{b}.down_proj.weight"] = (256, 768)
    for tap, d in (("us6", 1280), ("us10", 320)):
        for i in range(3):
            expected[f"adapters.{tap}.layers.{i}.norm.linear.weight"] = (d, 256)
            expected[f"adapters.{tap}.layers.{i}.up_proj.weight"] = (2 * d, d)
            expected[f"adapters.{tap}.layers.{i}.down_proj.weight"] = (d, d)
    assert shapes == expected


def test_sd_head_parameter_count_matches_reference_config():
    with torch.device("meta"):
        heads = ProjectionHeads(SD_CHANNELS)
    per_block = sum(3 * (3 * d * d + 256 * d) for d in SD_CHANNELS.values())
    mapping = 256 * 256 + 2 * 256 + 2 * (256 + 256 * 1536 + 768 * 256)
    assert sum(p.numel() for p in heads.parameters()) == per_block + mapping  # ~125.0 M


@pytest.mark.parametrize("head_norm", ["adarms", "film"])
@pytest.mark.parametrize("use_gating", [True, False])
def test_heads_are_identity_at_init(head_norm, use_gating):
    heads = ProjectionHeads({"a": 48, "b": 16}, HeadConfig(head_norm=head_norm, use_gating=use_gating, ffn_expansion=2))
    tokens = {"a": torch.randn(5, 7, 48), "b": torch.randn(5, 3, 16)}
    out = heads(tokens, torch.tensor([1, 100, 261, 500, 998]))
    for name in tokens:
        assert torch.equal(out[name], tokens[name])


def test_film_has_separate_zero_initialised_scale_and_shift():
    norm = FiLMNorm(8, 4)
    assert tuple(norm.linear.weight.shape) == (16, 4)
    assert torch.count_nonzero(norm.linear.weight) == 0
    x, cond = torch.randn(2, 5, 8), torch.randn(2, 4)
    plain = rms_norm(x, torch.ones(8))
    torch.testing.assert_close(norm(x, cond), plain)
    with torch.no_grad():  # shift only: the output moves by the shift, not by a scale (the reference bug)
        norm.linear.weight.zero_()
        norm.linear.weight[8:, 0] = 1.0
    cond = torch.tensor([[2.0, 0, 0, 0], [3.0, 0, 0, 0]])
    torch.testing.assert_close(norm(x, cond), plain + cond[:, :1, None])
    with torch.no_grad():  # scale only
        norm.linear.weight.zero_()
        norm.linear.weight[:8, 0] = 1.0
    torch.testing.assert_close(norm(x, cond), plain * (1 + cond[:, :1, None]))


def test_swiglu_value_first_gate_second():
    layer = LinearSwiGLU(3, 2)
    x = torch.randn(4, 3)
    h = x @ layer.weight.T
    torch.testing.assert_close(layer(x), h[:, :2] * F.silu(h[:, 2:]))


def test_fourier_features_cos_then_sin():
    ff = FourierFeatures(1, 8)
    t = torch.tensor([[0.25], [0.5]])
    f = 2 * math.pi * t @ ff.weight.T
    torch.testing.assert_close(ff(t), torch.cat([f.cos(), f.sin()], dim=-1))


def test_rms_norm_computes_in_float32_and_keeps_dtype():
    x = torch.randn(2, 3, 64).to(torch.bfloat16) * 100
    out = rms_norm(x, torch.ones(64))
    assert out.dtype == torch.bfloat16
    ref = x.float() / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)


def test_condition_depends_on_normalised_t():
    heads = ProjectionHeads({"a": 8})
    cond = heads.condition(torch.tensor([0, 999]))
    assert cond.shape == (2, 256)
    assert not torch.allclose(cond[0], cond[1])


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError, match="head_norm"):
        HeadConfig(head_norm="layernorm")
    with pytest.raises(ConfigError, match="unknown head option"):
        HeadConfig.from_dict({"depth": 3, "widht": 4})


def test_strict_load_round_trip_and_config_inference():
    config = HeadConfig(head_norm="film", depth=2, mapping_depth=1, mapping_d_ff=32, cond_dim=16)
    src = ProjectionHeads({"us6": 24, "us10": 8}, config)
    _randomize(src)
    state = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}  # released files are bf16
    inferred = infer_head_config(state)
    assert (inferred.head_norm, inferred.depth, inferred.mapping_depth, inferred.mapping_d_ff, inferred.cond_dim) == \
        ("film", 2, 1, 32, 16)
    dst = heads_from_state(state)
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, state[k].float())
    only = heads_from_state(state, taps=["us10"])
    assert only.taps == ("us10",)


def test_wrong_heads_are_refused_with_a_hint():
    film = ProjectionHeads({"us6": 24}, HeadConfig(head_norm="film"))
    adarms = ProjectionHeads({"us6": 24})
    with pytest.raises(CheckpointMismatchError, match="head_norm='film'"):
        adarms.load_reference_state(film.state_dict(), "released.safetensors")
    other_taps = ProjectionHeads({"us7": 24}).state_dict()
    with pytest.raises(CheckpointMismatchError, match="missing key"):
        adarms.load_reference_state(other_taps, "x")


def test_load_heads_from_full_layout_state_dict():
    src = ProjectionHeads({"us6": 16})
    _randomize(src, 1)
    state = {"unet_feature_extractor_cleandift.conv_in.weight": torch.zeros(2, 2), **src.state_dict(),
             "timestep": torch.tensor(255.5)}
    heads, t = load_heads(state)
    assert t == pytest.approx(255.5)
    torch.testing.assert_close(heads.state_dict()["adapters.us6.layers.0.up_proj.weight"],
                               src.state_dict()["adapters.us6.layers.0.up_proj.weight"])
    with pytest.raises(CheckpointMismatchError, match="no projection heads"):
        load_heads({"conv_in.weight": torch.zeros(1)})


def test_project_features_identity_at_init_and_batched_t():
    heads = ProjectionHeads({"us6": 16, "mid": 32})
    feats = {"us6": torch.randn(3, 16, 4, 5), "mid": torch.randn(3, 32, 2, 2)}
    out = project_features(heads, feats, 499)
    for k in feats:
        torch.testing.assert_close(out[k], feats[k])
    _randomize(heads, 2)
    per_image = project_features(heads, feats, torch.tensor([10, 499, 900]))
    single = project_features(heads, {k: v[1:2] for k, v in feats.items()}, 499)
    torch.testing.assert_close(per_image["us6"][1:2], single["us6"])
    assert not torch.allclose(per_image["us6"][0:1], single["us6"])
    with pytest.raises(ValueError, match="timesteps"):
        project_features(heads, feats, torch.tensor([1, 2]))
