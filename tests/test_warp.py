"""Synthetic warps: ground truth by construction, strong enough, and DIFT matching on top of them."""

import math

import pytest
import torch

from cleandift.eval.warp import (
    Warp, WarpConfig, forward_points, make_warp_pairs, nothing_moves, pixel_centres, predict_matches, warp_image,
    warp_pck,
)

IDENTITY = WarpConfig(max_rotation_deg=0, scale_range=(1, 1), max_translation=0, max_perspective=0, elastic_alpha=0)


def _blobs(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Objects on a -1 background: random bright ellipses with texture."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.full((n, 1, size, size), -1.0)
    for i in range(n):
        cx, cy = (torch.rand(2, generator=g) * 8 + size / 2 - 4).tolist()
        rx, ry = (torch.rand(2, generator=g) * 4 + 6).tolist()
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
        out[i, 0][inside] = torch.rand(int(inside.sum()), generator=g) * 1.5 - 0.5
    return out


def _rotation(deg: float) -> Warp:
    a = math.radians(deg)
    h = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return Warp(h, torch.zeros(2, 3, 3))


def test_identity_warp_keeps_image_and_points():
    images = _blobs()
    pairs = make_warp_pairs(images, IDENTITY, n_points=8, seed=0)
    assert torch.allclose(pairs.target, pairs.source, atol=1e-5)
    assert pairs.valid.all()
    assert (pairs.trg_xy - pairs.src_xy).abs().max() <= 0.125 + 1e-6  # half a fine cell at refine=4
    assert nothing_moves(pairs) == {"pck@0.10": 1.0, "pck@0.05": 1.0}


def test_rotation_by_90_degrees_matches_hand_computed_points():
    # forward map (x, y) -> (-y, x) in normalised coords; on a 32 px image pixel (x, y) -> (31 - y, x)
    warp = _rotation(90)
    src = torch.tensor([[3.0, 5.0], [20.0, 10.0], [16.0, 16.0]])
    trg, ok = forward_points(warp, src, (32, 32), refine=4)
    assert ok.all()
    expected = torch.stack([31 - src[:, 1], src[:, 0]], dim=1)
    assert torch.allclose(trg, expected, atol=0.13)
    # the warped image agrees: target pixel (31 - y, x) shows source pixel (x, y)
    image = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 32, 32) / 1024
    warped = warp_image(image, warp, background=0.0)
    for (x, y), (tx, ty) in zip(src.long().tolist(), expected.long().tolist()):
        assert warped[0, ty, tx] == pytest.approx(image[0, y, x].item(), abs=1e-4)


def test_points_leaving_the_frame_are_invalid():
    warp = Warp(torch.tensor([[1.0, 0, 1.5], [0, 1.0, 0], [0, 0, 1.0]]), torch.zeros(2, 3, 3))  # shift by 0.75 width
    _, ok = forward_points(warp, torch.tensor([[2.0, 16.0], [28.0, 16.0]]), (32, 32))
    assert ok.tolist() == [True, False]


def test_default_warps_are_strong_and_points_lie_on_the_object():
    images = _blobs(n=40)
    pairs = make_warp_pairs(images, WarpConfig(), n_points=12, seed=1)
    assert pairs.valid.float().mean() > 0.9
    on_object = images[torch.arange(40)[:, None], 0, pairs.src_xy[..., 1].long(), pairs.src_xy[..., 0].long()]
    assert (on_object[pairs.valid] > -0.6).all()
    assert nothing_moves(pairs)["pck@0.10"] <= 0.3  # issue 5: otherwise the warp is too mild


def test_pairs_are_reproducible_per_seed():
    a, b = make_warp_pairs(_blobs(), seed=3), make_warp_pairs(_blobs(), seed=3)
    assert torch.equal(a.target, b.target) and torch.equal(a.trg_xy, b.trg_xy)
    assert not torch.equal(a.target, make_warp_pairs(_blobs(), seed=4).target)


def test_predict_matches_with_perfect_features_recovers_ground_truth():
    # features = the target's own pixel coordinates (as channels) make matching exact
    _, pix = pixel_centres((16, 16))
    coords = torch.cat([pix.permute(2, 0, 1), torch.ones(1, 16, 16)]) / 16  # (3, 16, 16), distinct directions
    feats = coords[None]
    src_xy = torch.tensor([[[2.0, 3.0], [10.0, 7.0], [15.0, 0.0]]])
    pred = predict_matches(feats, feats, src_xy, (16, 16))
    assert torch.equal(pred, src_xy)


def test_warp_pck_counts_only_valid_points():
    pairs = make_warp_pairs(_blobs(n=2), IDENTITY, n_points=4, seed=0)
    pairs.valid[1] = False
    pred = pairs.trg_xy.clone()
    pred[0, 0] += torch.tensor([3.0, 0.0])  # 3 px: wrong at 0.05 x 32 = 1.6, right at 3.2
    assert warp_pck(pred, pairs) == {"pck@0.10": 1.0, "pck@0.05": 0.75}
