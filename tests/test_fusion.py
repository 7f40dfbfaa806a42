"""Fusion descriptors (DINOv2 only, SD-DINO, TLFR zero-shot) and the adaptive flip test.

The tiny SD model (128 px: us8 8x8, us5 4x4, us2 2x2) is fused with a tiny DINOv2 at 112 px (8x8
patches), so every grid relation of the real protocol (960 / 840 px → 60 / 30 / 15 and 60) holds
at small scale.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cleandift import CleanExtractor, NoisyExtractor
from cleandift.errors import ConfigError
from cleandift.eval import fusion as fu
from cleandift.eval.descriptors import DenseDescriptor, PairContext
from cleandift.eval.dinov2 import load_dinov2
from cleandift.images import ResizeTransform, resize_image

SD = 128
SD_CH = 64 * 3  # tiny model: us8 / us5 / us2 have 64 channels each
DINO_CH = 32


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=DINO_CH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       patch_size=14, image_size=112)
    folder = tmp_path_factory.mktemp("dino") / "tiny-dinov2"
    Dinov2Model(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def dino(dino_dir):
    return load_dinov2(str(dino_dir), image_size=112, layer=-1, local_files_only=True)


@pytest.fixture(scope="module")
def extractor(tiny_backbone):
    return CleanExtractor(tiny_backbone)


@pytest.fixture
def images():
    return torch.rand(2, 3, SD, SD, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _part_norms(out: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    return out[:, :split].norm(dim=1), out[:, split:].norm(dim=1)


# ---------------------------------------------------------------------------------------------- building blocks
def test_fuse_parts_normalises_each_part_then_renormalises():
    a, b = torch.randn(2, 5, 3, 3) * 7, torch.randn(2, 3, 3, 3) * 0.01
    raw = fu.fuse_parts([a, b], weights=(2.0, 1.0), renormalize=False)
    torch.testing.assert_close(raw[:, :5].norm(dim=1), torch.full((2, 3, 3), 2.0))
    torch.testing.assert_close(raw[:, 5:].norm(dim=1), torch.full((2, 3, 3), 1.0))
    out = fu.fuse_parts([a, b], weights=(2.0, 1.0))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 3, 3))
    na, nb = _part_norms(out, 5)
    torch.testing.assert_close(na, torch.full_like(na, 2 / math.sqrt(5)))
    torch.testing.assert_close(nb, torch.full_like(nb, 1 / math.sqrt(5)))
    with pytest.raises(ValueError, match="weights"):
        fu.fuse_parts([a, b], weights=(1.0,))


def test_co_pca_is_joint_exact_and_order_independent():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 5, 5, generator=g), torch.randn(12, 4, 6, generator=g) + 1.0
    pa, pb = fu.co_pca(a, b, 4)
    assert pa.shape == (4, 5, 5) and pb.shape == (4, 4, 6)
    pooled = torch.cat([pa.flatten(1), pb.flatten(1)], dim=1)  # (4, 49)
    cov = torch.cov(pooled)
    assert torch.allclose(pooled.mean(1), torch.zeros(4), atol=1e-5)  # centred on the *joint* mean
    assert torch.allclose(cov - torch.diag(torch.diag(cov)), torch.zeros(4, 4), atol=1e-4)
    rows = torch.cat([a.flatten(1).T, b.flatten(1).T])
    s = torch.linalg.svdvals(rows - rows.mean(0))
    torch.testing.assert_close(torch.diag(cov), s[:4] ** 2 / (rows.shape[0] - 1), rtol=1e-4, atol=1e-5)
    _, qa = fu.co_pca(b, a, 4)  # the basis depends on the pair, not on which image comes first
    torch.testing.assert_close(qa, pa, rtol=1e-4, atol=1e-5)
    assert fu.co_pca(a, b, 100)[0].shape[0] == 12  # clipped to the channels


def test_stack_pyramid_is_sd_dino_order():
    s3, s4, s5 = torch.randn(2, 8, 8), torch.randn(3, 4, 4), torch.randn(4, 2, 2)
    out = fu.stack_pyramid([s3, s4, s5])
    assert out.shape == (9, 8, 8)
    torch.testing.assert_close(out[:2], s3)
    s45 = torch.cat([s4, F.interpolate(s5[None], size=(4, 4), mode="bilinear", align_corners=False)[0]])
    torch.testing.assert_close(out[2:], F.interpolate(s45[None], size=(8, 8), mode="bilinear", align_corners=False)[0])


# ---------------------------------------------------------------------------------------------- descriptors
def test_descriptors_satisfy_the_protocol(extractor, dino):
    for desc in (fu.Dinov2Descriptor(dino), fu.SDDinoDescriptor(extractor, dino, sd_size=SD),
                 fu.TLFRDescriptor(extractor, dino, sd_size=SD)):
        assert isinstance(desc, DenseDescriptor)
        assert hasattr(desc, "match_pair")
        json.dumps(desc.describe())


def test_dinov2_descriptor(dino, images):
    desc = fu.Dinov2Descriptor(dino)
    assert desc.size == 112 and desc.resize == "pad" and desc.match == fu.NN_CELLS
    out = desc(images)
    assert out.shape == (2, DINO_CH, 8, 8)
    torch.testing.assert_close(out, F.normalize(dino(images), dim=1))
    info = desc.describe()
    assert info["kind"] == "dinov2" and info["dino_layer"] == 1 and info["weights"]["dino_fingerprint"]


def test_tlfr_descriptor_parts(extractor, dino, images):
    desc = fu.TLFRDescriptor(extractor, dino, sd_size=SD, taps=("us2", "us5", "us8"))
    assert desc.taps == ("us8", "us5", "us2")  # finest first whatever the given order
    assert desc.size == SD and desc.match == fu.TLFR_SOFT
    out = desc(images, "a photo of a cat")
    assert out.shape == (2, SD_CH + DINO_CH, 8, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 8, 8))
    n_sd, n_dino = _part_norms(out, SD_CH)
    torch.testing.assert_close(n_sd, torch.full_like(n_sd, 1 / math.sqrt(2)))
    torch.testing.assert_close(n_dino, torch.full_like(n_dino, 1 / math.sqrt(2)))
    # the SD part is cat[us8, up(us5), up(us2)] normalised as one vector; the DINO part separately
    feats = extractor(images, prompts="a photo of a cat", taps=["us8", "us5", "us2"])
    up = lambda m: F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False)  # noqa: E731
    sd = F.normalize(torch.cat([feats["us8"], up(feats["us5"]), up(feats["us2"])], 1), dim=1)
    torch.testing.assert_close(out[:, :SD_CH] * math.sqrt(2), sd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, SD_CH:] * math.sqrt(2), F.normalize(dino(images), dim=1), rtol=1e-4, atol=1e-5)


def test_tlfr_part_weights(extractor, dino, images):
    out = fu.TLFRDescriptor(extractor, dino, sd_size=SD, part_weights=(3.0, 1.0))(images[:1])
    n_sd, n_dino = _part_norms(out, SD_CH)
    torch.testing.assert_close(n_sd, torch.full_like(n_sd, 3 / math.sqrt(10)))
    torch.testing.assert_close(n_dino, torch.full_like(n_dino, 1 / math.sqrt(10)))


def test_sd_dino_without_co_pca(extractor, dino, images):
    desc = fu.SDDinoDescriptor(extractor, dino, sd_size=SD, co_pca=False)
    out = desc(images)
    assert out.shape == (2, SD_CH + DINO_CH, 8, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 8, 8))
    n_sd, n_dino = _part_norms(out, SD_CH)
    torch.testing.assert_close(n_sd, n_dino)
    a, b = out[0], out[1]
    assert desc.pair_descriptors(a, b) == (a, b)  # nothing pair-dependent without co-PCA


def test_sd_dino_co_pca_pack_unpack_and_fuse(extractor, dino, images):
    desc = fu.SDDinoDescriptor(extractor, dino, sd_size=SD, pca_dims=(16, 16, 4))
    raw = desc(images)
    assert raw.shape == (2, SD_CH + DINO_CH, 8, 8)
    sd, dino_part = desc.unpack(raw[0])
    feats = extractor(images[:1], taps=["us8", "us5", "us2"])
    for native, name in zip(sd, ("us8", "us5", "us2")):
        assert native.shape[-2:] == feats[name].shape[-2:]  # 8x8, 4x4, 2x2 recovered exactly
        torch.testing.assert_close(native, feats[name][0])
    torch.testing.assert_close(dino_part, dino(images[:1])[0])
    src, trg = desc.fuse_pair(raw[0], raw[1])
    assert src.shape == trg.shape == (16 + 16 + 4 + DINO_CH, 8, 8)
    torch.testing.assert_close(src.norm(dim=0), torch.ones(8, 8))
    n_sd, n_dino = src[:36].norm(dim=0), src[36:].norm(dim=0)
    torch.testing.assert_close(n_sd, torch.full_like(n_sd, 1 / math.sqrt(2)))
    torch.testing.assert_close(n_dino, torch.full_like(n_dino, 1 / math.sqrt(2)))
    # default 256 dims are clipped: us8 to its 64 channels, us5 to 2 x 16 and us2 to 2 x 4 vectors
    wide = fu.SDDinoDescriptor(extractor, dino, sd_size=SD)
    assert wide.fuse_pair(raw[0], raw[1])[0].shape[0] == 64 + 32 + 8 + DINO_CH


def test_features_do_not_depend_on_the_batch(tiny_backbone, dino, images):
    noisy = NoisyExtractor(tiny_backbone, t=50, ensemble=2, noise="shared", sample_posterior=False)
    desc = fu.TLFRDescriptor(noisy, dino, sd_size=SD, seed=42)
    both = desc(images, ["a photo of a cat", "a photo of a dog"])
    torch.testing.assert_close(both[1:], desc(images[1:], "a photo of a dog"))


class SeedSpy:
    """Wraps an extractor and records the seed of the generator each call gets."""

    def __init__(self, inner) -> None:
        self.inner, self.seeds = inner, []
        self.backbone, self.noise_mode = inner.backbone, inner.noise_mode

    def __call__(self, images, prompts=None, taps=None, generator=None):
        self.seeds.append(generator.initial_seed())
        return self.inner(images, prompts=prompts, taps=taps, generator=generator)


@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_shared_noise_is_one_draw_for_every_image(tiny_backbone, dino, images, noise):
    spy = SeedSpy(NoisyExtractor(tiny_backbone, t=100, ensemble=1, noise=noise, sample_posterior=False))
    fu.SDDinoDescriptor(spy, dino, sd_size=SD, seed=42)(images)
    if noise == "shared":  # SD-DINO / TLFR: a fixed noise (seed 42) shared by all images
        assert spy.seeds == [42, 42]
    else:  # DIFT-style: independent per image, still reproducible from the image content
        assert spy.seeds[0] != spy.seeds[1]


def test_describe_tracks_feature_settings(extractor, dino):
    a = fu.TLFRDescriptor(extractor, dino, sd_size=SD).describe()
    b = fu.TLFRDescriptor(extractor, dino, sd_size=SD, part_weights=(2.0, 1.0)).describe()
    c = fu.SDDinoDescriptor(extractor, dino, sd_size=SD).describe()
    assert a != b and a["kind"] == "tlfr" and c["kind"] == "sd-dino" and c["co_pca"] is True
    assert a["weights"]["unet_fingerprint"] and a["weights"]["dino_fingerprint"]


# ---------------------------------------------------------------------------------------------- builders / presets
def test_builders(extractor, dino, dino_dir):
    d = fu.build_dinov2_descriptor(dino_model=str(dino_dir), dino_size=112, dino_layer=-1, local_files_only=True)
    assert isinstance(d, fu.Dinov2Descriptor) and d.size == 112
    s = fu.build_sd_dino_descriptor(extractor=extractor, dino=dino, sd_size=SD, pca_dims=(8, 8, 8))
    assert isinstance(s, fu.SDDinoDescriptor) and s.co_pca and s.size == SD
    t = fu.build_tlfr_descriptor(extractor=extractor, dino=dino, sd_size=SD)
    assert isinstance(t, fu.TLFRDescriptor)
    with pytest.raises(ValueError, match="flip_permutations"):
        fu.build_tlfr_descriptor(extractor=extractor, dino=dino, sd_size=SD, adaptive_flip=True)
    f = fu.build_tlfr_descriptor(extractor=extractor, dino=dino, sd_size=SD, adaptive_flip=True,
                                 flip_permutations={"cat": [[0, 1]]})
    assert isinstance(f, fu.AdaptiveFlipDescriptor) and f.permutations["cat"][:3] == [1, 0, 2]
    assert f.describe() == t.describe() and f.size == t.size


def test_build_descriptor_from_preset_settings(tiny_pipeline_dir, tiny_backbone, extractor, dino_dir, tmp_path):
    from cleandift.eval.presets import resolve_settings

    fusion = dict(dinov2=str(dino_dir), dino_size=112, dino_layer=-1, facet="token", co_pca=True, pca_dims=(8, 8, 8),
                  weights=(1.0, 1.0))
    s = resolve_settings("sd-dino", model=str(tiny_pipeline_dir), size=SD, fusion=fusion)
    desc = fu.build_descriptor(s, extractor=extractor, device="cpu")
    assert isinstance(desc, fu.SDDinoDescriptor) and desc.taps == ("us8", "us5", "us2")
    assert desc.match == fu.NN_CELLS and desc.seed == 42 and desc.resize == "pad"
    from cleandift.eval.presets import build_descriptor as preset_build

    wired = preset_build(s, backbone=tiny_backbone)  # the presets' lazy import reaches this module
    assert isinstance(wired, fu.SDDinoDescriptor) and wired.describe()["extractor"]["mode"] == "noisy"
    tlfr = dict(dinov2=str(dino_dir), dino_size=112, dino_layer=-1, facet="token", adaptive_flip=True, freeu=False)
    with pytest.raises(ConfigError, match="flip_permutations"):
        fu.build_descriptor(resolve_settings("tlfr-zero-shot", size=SD, fusion=tlfr), extractor=extractor)
    table = tmp_path / "flip.json"
    table.write_text(json.dumps({"cat": [[0, 1]]}))
    desc = fu.build_descriptor(resolve_settings("tlfr-zero-shot", size=SD, fusion={**tlfr, "flip_permutations":
                                                                                   str(table)}), extractor=extractor)
    assert isinstance(desc, fu.AdaptiveFlipDescriptor) and desc.match == fu.TLFR_SOFT
    with pytest.raises(ConfigError, match="unknown fusion"):
        fu.build_descriptor(resolve_settings("sd-dino", size=SD, fusion={"bogus": 1}), extractor=extractor)
    with pytest.raises(ConfigError, match="freeu"):
        fu.build_descriptor(resolve_settings("tlfr-zero-shot", size=SD, fusion={**tlfr, "freeu": True}),
                            extractor=extractor)


# ---------------------------------------------------------------------------------------------- adaptive flip
def test_permutations():
    assert fu.permutation_from_pairs([[0, 1], [3, 4]], 6) == [1, 0, 2, 4, 3, 5]
    with pytest.raises(ValueError):
        fu.permutation_from_pairs([[0, 1], [1, 2]], 4)
    table = fu.load_flip_permutations({"cat": [[0, 1]], "bottle": [0, 1, 2]}, num_keypoints=3)
    assert table == {"cat": [1, 0, 2], "bottle": [0, 1, 2]}
    with pytest.raises(ValueError, match="not a permutation"):
        fu.load_flip_permutations({"cat": [0, 0, 1]})


def test_flip_keypoints_and_mirrored_transform():
    kps = torch.tensor([[10.0, 5.0], [50.0, 6.0], [float("nan"), float("nan")]])
    out = fu.flip_keypoints(kps, 64, [1, 0, 2])
    torch.testing.assert_close(out[0], torch.tensor([13.0, 6.0]))  # keypoint 0 = mirrored keypoint 1
    torch.testing.assert_close(out[1], torch.tensor([53.0, 5.0]))
    assert torch.isnan(out[2]).all()
    from PIL import Image

    _, tf = resize_image(Image.new("RGB", (90, 40)), 64, "pad")
    mirrored = fu.mirrored_transform(tf)
    pts = torch.tensor([[3.0, 7.0], [80.0, 30.0]])
    expected = tf.to_model(pts)
    expected[:, 0] = 63 - expected[:, 0]
    torch.testing.assert_close(mirrored.to_model(fu.flip_keypoints(pts, 90)), expected)
    mask = fu.content_mask(tf, (8, 8))
    assert mask[0].sum() == 0 and mask[4].all()  # padding rows above and below the content


class ConvDescriptor:
    """A known, deliberately non-mirror-symmetric function of the image: fixed random conv + pooling."""

    size = 64
    resize = "stretch"
    match = fu.MatchSettings("argmax", "pixels", "bilinear")

    def __init__(self) -> None:
        self.weight = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))

    def __call__(self, images, prompts=None):
        return F.avg_pool2d(F.conv2d(images, self.weight, padding=2), 4)

    def describe(self):
        return {"kind": "conv"}


def _smooth_image(seed: int) -> torch.Tensor:
    noise = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(noise, size=(64, 64), mode="bilinear", align_corners=False)[0]


def _context(desc, src_img, trg_img, kps_all, kps_ids, category="cat") -> PairContext:
    identity = ResizeTransform(64, 64, 64, 64, 1.0, 1.0, 0.0, 0.0, "stretch")
    images = {"src": src_img, "trg": trg_img}

    def get_features(image_id, flipped=False):
        img = images[image_id]
        return desc((img.flip(-1) if flipped else img)[None])[0]

    return PairContext(category, "src", "trg", (64, 64), (64, 64), identity, identity, kps_ids=tuple(kps_ids),
                       get_features=get_features, extra={} if kps_all is None else {"src_kps_all": kps_all})


TRG_KPS = torch.tensor([[10.0, 20.0], [50.0, 22.0], [32.0, 40.0], [20.0, 50.0]])
PERM = [1, 0, 2, 3]  # keypoints 0 and 1 are a left/right pair


def _mirrored_source_kps() -> torch.Tensor:
    """Keypoints of the mirrored target image: keypoint k sits at the mirror of the target's perm[k]."""
    return fu.flip_keypoints(TRG_KPS, 64, PERM)


def test_adaptive_flip_picks_the_mirror_when_the_source_is_mirrored():
    base = ConvDescriptor()
    flip = fu.AdaptiveFlipDescriptor(base, {"cat": PERM}, distance_size=None)
    trg = _smooth_image(1)
    src = trg.flip(-1)
    kps = _mirrored_source_kps()
    ctx = _context(base, src, trg, kps, range(4))
    pred = flip.match_pair(base(src[None])[0], base(trg[None])[0], kps, ctx)
    assert flip.last_decision.flipped and flip.last_decision.flipped_distance == pytest.approx(0.0, abs=1e-3)
    assert flip.last_decision.distance > 0.1
    torch.testing.assert_close(pred, TRG_KPS)  # left/right ids swapped back: every keypoint exact


def test_adaptive_flip_keeps_the_original_otherwise():
    base = ConvDescriptor()
    flip = fu.AdaptiveFlipDescriptor(base, {"cat": PERM}, distance_size=None)
    trg = _smooth_image(1)
    ctx = _context(base, trg.clone(), trg, TRG_KPS, range(4))
    pred = flip.match_pair(base(trg[None])[0], base(trg[None])[0], TRG_KPS, ctx)
    assert not flip.last_decision.flipped and flip.last_decision.distance == pytest.approx(0.0, abs=1e-3)
    torch.testing.assert_close(pred, TRG_KPS)


def test_adaptive_flip_needs_the_partner_keypoint_and_a_table():
    base = ConvDescriptor()
    trg = _smooth_image(2)
    src = trg.flip(-1)
    kps = _mirrored_source_kps()
    kps[1] = float("nan")  # keypoint 1 invisible in the source: keypoint 0 cannot use the flip
    ids = [0, 2, 3]
    ctx = _context(base, src, trg, kps, ids)
    s, t = base(src[None])[0], base(trg[None])[0]
    original = fu._match(s, t, kps[ids], ctx, base.match)
    pred = fu.AdaptiveFlipDescriptor(base, {"cat": PERM}, distance_size=None).match_pair(s, t, kps[ids], ctx)
    torch.testing.assert_close(pred[0], original[0])
    torch.testing.assert_close(pred[1:], TRG_KPS[[2, 3]])
    unknown = fu.AdaptiveFlipDescriptor(base, {"dog": PERM}, distance_size=None)
    torch.testing.assert_close(unknown.match_pair(s, t, kps[ids], ctx), original)
    with pytest.raises(ValueError, match="permutations"):
        fu.AdaptiveFlipDescriptor(base, None)


def test_nn_feature_distance():
    a = torch.randn(4, 6, 6)
    assert fu.nn_feature_distance(a, a, size=None) == pytest.approx(0.0, abs=1e-3)
    assert fu.nn_feature_distance(a, a, size=8) == pytest.approx(0.0, abs=1e-3)
    b = a + 1.0
    assert fu.nn_feature_distance(a, b, size=None) > 0.5
    mask = torch.zeros(6, 6, dtype=torch.bool)
    assert fu.nn_feature_distance(a, a, src_mask=mask, size=None) == float("inf")


def test_tlfr_match_pair_end_to_end(extractor, dino, images):
    desc = fu.build_tlfr_descriptor(extractor=extractor, dino=dino, sd_size=SD, adaptive_flip=True,
                                    flip_permutations={"cat": [[0, 1]]}, flip_distance_size=16)
    identity = ResizeTransform(SD, SD, SD, SD, 1.0, 1.0, 0.0, 0.0, "pad")
    feats = {"src": desc(images[:1])[0], "trg": desc(images[1:])[0]}
    ctx = PairContext("cat", "src", "trg", (SD, SD), (SD, SD), identity, identity, kps_ids=(0, 1),
                      get_features=lambda i, flipped=False: desc(images[:1].flip(-1) if flipped else images[:1])[0]
                      if i == "src" else feats[i],
                      extra={"src_kps_all": torch.tensor([[20.0, 30.0], [90.0, 31.0]])})
    pred = desc.match_pair(feats["src"], feats["trg"], torch.tensor([[20.0, 30.0], [90.0, 31.0]]), ctx)
    assert pred.shape == (2, 2) and torch.isfinite(pred).all()
    assert (pred >= -0.5).all() and (pred <= SD - 0.5).all()
    assert desc.last_decision is not None


def test_adaptive_flip_without_all_source_keypoints_uses_the_queried_partners():
    base = ConvDescriptor()
    trg = _smooth_image(3)
    src = trg.flip(-1)
    kps = _mirrored_source_kps()
    ids = [0, 2, 3]  # keypoint 1 (partner of 0) is not queried -> keypoint 0 keeps its original match
    ctx = _context(base, src, trg, None, ids)
    s, t = base(src[None])[0], base(trg[None])[0]
    original = fu._match(s, t, kps[ids], ctx, base.match)
    pred = fu.AdaptiveFlipDescriptor(base, {"cat": PERM}, distance_size=None).match_pair(s, t, kps[ids], ctx)
    torch.testing.assert_close(pred[0], original[0])
    torch.testing.assert_close(pred[1:], TRG_KPS[[2, 3]])
    ctx_all = _context(base, src, trg, None, range(4))
    full = fu.AdaptiveFlipDescriptor(base, {"cat": PERM}, distance_size=None).match_pair(s, t, kps, ctx_all)
    torch.testing.assert_close(full, TRG_KPS)
