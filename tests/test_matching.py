"""Matching: known answers (identity, mirror, positional codes), DIFT equivalence, soft-argmax, mutual NN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cleandift.eval.matching as matching
from cleandift.eval.matching import (cell_centers, match_points, mutual_nearest_neighbors, source_descriptors,
                                     window_soft_argmax)
from cleandift.images import resize_image


def random_map(c=16, h=6, w=8, seed=0):
    return torch.randn(c, h, w, generator=torch.Generator().manual_seed(seed))


def interior_points(h_img, w_img, n=12, seed=0, margin=6):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randint(margin, w_img - margin, (n,), generator=g)
    ys = torch.randint(margin, h_img - margin, (n,), generator=g)
    return torch.stack([xs, ys], -1).float()


def dift_reference(src_map, trg_map, src_xy, src_hw, trg_hw):
    """DIFT's eval_spair.py recipe, literally: upsample both maps to the image, index, cosine, argmax."""
    up_src = F.interpolate(src_map[None], size=src_hw, mode="bilinear", align_corners=False)[0]
    up_trg = F.interpolate(trg_map[None], size=trg_hw, mode="bilinear", align_corners=False)[0]
    up_trg = F.normalize(up_trg, dim=0)
    out = []
    for x, y in src_xy.long().tolist():
        v = F.normalize(up_src[:, y, x], dim=0)
        idx = int((v[:, None, None] * up_trg).sum(0).flatten().argmax())
        out.append([idx % trg_hw[1], idx // trg_hw[1]])
    return torch.tensor(out, dtype=torch.float32)


def test_identical_images_match_perfectly():
    f = random_map()
    pts = interior_points(48, 64)
    soft = {"grid": "pixels", "method": "soft-argmax", "window": 1, "temperature": 1e-4}
    for grid_kw in ({"grid": "pixels"}, soft):
        pred = match_points(f, f, pts, (48, 64), (48, 64), **grid_kw)
        assert torch.allclose(pred, pts, atol=1e-3), grid_kw


def test_pixel_grid_equals_dift_upsample_argmax(monkeypatch):
    monkeypatch.setattr(matching, "CHUNK_FLOATS", 16 * 64 * 3)  # a few rows per chunk: exercise chunking
    src, trg = random_map(seed=1), random_map(seed=2)
    pts = interior_points(40, 52, seed=3, margin=0)
    pred = match_points(src, trg, pts, (40, 52), (37, 61))
    assert torch.equal(pred, dift_reference(src, trg, pts, (40, 52), (37, 61)))


def test_stretch_transform_reproduces_matching_in_the_original_frame():
    """Maps of a 96x96 stretched frame + the transform == maps taken to cover the original directly."""
    src, trg = random_map(seed=4), random_map(seed=5)
    _, tf_src = resize_image(Image.new("RGB", (52, 40)), 96, "stretch")
    _, tf_trg = resize_image(Image.new("RGB", (61, 37)), 96, "stretch")
    pts = interior_points(40, 52, seed=6, margin=0)
    via_tf = match_points(src, trg, pts, (40, 52), (37, 61), src_transform=tf_src, trg_transform=tf_trg)
    assert torch.allclose(via_tf, dift_reference(src, trg, pts, (40, 52), (37, 61)))


@pytest.mark.parametrize("policy", ["stretch", "pad", "crop"])
def test_separable_cosines_equal_brute_force_sampling(policy):
    """The never-materialised upsampled map gives the same cosines as sampling every pixel."""
    from cleandift.features import sample_points

    trg = random_map(c=24, h=5, w=7, seed=12)
    q = F.normalize(torch.randn(3, 24, generator=torch.Generator().manual_seed(13)), dim=-1)
    h_img, w_img = 23, 31
    _, tf = resize_image(Image.new("RGB", (w_img, h_img)), 56, policy)
    ys, xs = torch.meshgrid(torch.arange(h_img).float(), torch.arange(w_img).float(), indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    vecs = F.normalize(sample_points(trg[None], tf.to_model(pix)[None], (56, 56))[0], dim=-1)
    brute = (q @ vecs.t()).view(3, h_img, w_img).double()
    xs_m = tf.to_model(torch.stack([torch.arange(w_img).float(), torch.zeros(w_img)], -1))[:, 0]
    ys_m = tf.to_model(torch.stack([torch.zeros(h_img), torch.arange(h_img).float()], -1))[:, 1]
    fast = matching._pixel_cosines(q, trg, matching._axis(ys_m, 5, 56), matching._axis(xs_m, 7, 56),
                                   matching.neighbour_gram(trg))
    assert torch.allclose(fast, brute, atol=1e-5)


def test_pad_transform_identity():
    f = random_map(h=8, w=8)
    _, tf = resize_image(Image.new("RGB", (60, 40)), 64, "pad")
    pts = interior_points(40, 60, seed=7, margin=8)
    pred = match_points(f, f, pts, (40, 60), (40, 60), src_transform=tf, trg_transform=tf)
    assert torch.allclose(pred, pts, atol=1e-3)


@pytest.mark.parametrize("grid", ["pixels", "cells"])
def test_mirrored_image_with_mirrored_keypoints(grid):
    src = random_map(h=6, w=8, seed=8)
    trg = torch.flip(src, dims=[-1])  # the descriptor of the mirrored image
    w_img, h_img = 64, 48
    if grid == "cells":  # query exactly at cell centres: the answer is the mirrored centre
        pts = cell_centers((6, 8), (h_img, w_img))[[0, 9, 20, 47]]
    else:
        # away from the border half-cell, where the upsampled map is constant (ties -> first pixel)
        pts = interior_points(h_img, w_img, seed=9, margin=5)
    mirrored = torch.stack([w_img - 1 - pts[:, 0], pts[:, 1]], -1)
    pred = match_points(src, trg, pts, (h_img, w_img), (h_img, w_img), grid=grid)
    assert torch.allclose(pred, mirrored, atol=1e-4)


def test_positional_code_descriptor_recovers_a_known_shift():
    """Features = one-hot of the cell index; the target is the source shifted by 2 cells right."""
    h, w = 5, 7
    code = torch.eye(h * w).view(h * w, h, w)  # channel k is hot at cell k
    trg = torch.zeros_like(code)
    trg[:, :, 2:] = code[:, :, :-2]  # content moves 2 cells right (cells of 10 px)
    pts = cell_centers((h, w), (50, 70)).view(h, w, 2)[:, :-2].reshape(-1, 2)
    pred = match_points(code, trg, pts, (50, 70), (50, 70), grid="cells", source="cell")
    assert torch.allclose(pred, pts + torch.tensor([20.0, 0.0]))


def test_cells_grid_predicts_cell_centres_and_source_cell_lookup():
    f = random_map(h=4, w=4, seed=10)
    centres = cell_centers((4, 4), (40, 40))
    assert centres[0].tolist() == [4.5, 4.5] and centres[-1].tolist() == [34.5, 34.5]
    # any point inside a cell uses that cell's vector with source="cell"
    pts = torch.tensor([[0.0, 0.0], [9.0, 9.0], [10.0, 0.0], [39.0, 39.0]])
    vec = source_descriptors(f, pts, (40, 40), source="cell")
    cells = F.normalize(f.flatten(1).t(), dim=-1)
    assert torch.allclose(vec, cells[[0, 0, 1, 15]])
    pred = match_points(f, f, pts, (40, 40), (40, 40), grid="cells", source="cell")
    assert pred.tolist() == [[4.5, 4.5], [4.5, 4.5], [14.5, 4.5], [34.5, 34.5]]


def test_window_soft_argmax_by_hand():
    sim = torch.full((1, 5, 9), -1.0)
    sim[0, 2, 2] = 1.0
    sim[0, 2, 3] = 1.0  # tie with its right neighbour: expected x = 2.5
    sim[0, 2, 8] = 1.0  # equal peak far away, outside the +-2 window of the first argmax
    xy, peak = window_soft_argmax(sim, window=2, temperature=0.02)
    assert peak.item() == 1.0
    assert torch.allclose(xy, torch.tensor([[2.5, 2.0]]), atol=1e-6)
    # with a huge window the far peak joins: x = (2 + 3 + 8) / 3
    xy_all, _ = window_soft_argmax(sim, window=10, temperature=0.02)
    assert torch.allclose(xy_all, torch.tensor([[13 / 3, 2.0]]), atol=1e-5)
    # high temperature spreads the mass towards the window's mean
    xy_hot, _ = window_soft_argmax(sim, window=1, temperature=100.0)
    assert 2.0 < xy_hot[0, 0] < 3.0


def test_soft_argmax_on_cells_maps_fractional_cells_to_pixels():
    f = torch.zeros(2, 3, 4)
    f[0] = 1.0
    f[1, 1, 1] = f[1, 1, 2] = 5.0  # two equally best cells for a query along channel 1
    q = torch.zeros(2, 3, 4)
    q[1] = 1.0  # every source cell points along channel 1
    pred = match_points(q, f, torch.tensor([[5.0, 5.0]]), (30, 40), (30, 40), grid="cells",
                        method="soft-argmax")
    # cells (row 1, cols 1 and 2) of 10 px are centred at x = 14.5 and 24.5, y = 14.5 -> midpoint
    assert torch.allclose(pred, torch.tensor([[19.5, 14.5]]), atol=1e-4)


def test_mutual_nearest_neighbors():
    f = random_map(c=32, h=3, w=4, seed=11)
    ia, ib, sim = mutual_nearest_neighbors(f, f, chunk=5)
    assert torch.equal(ia, torch.arange(12)) and torch.equal(ib, ia) and torch.allclose(sim, torch.ones(12))
    # a: two cells both closest to b's single matching cell -> only one is mutual
    a = torch.tensor([[1.0, 0.9], [0.0, 0.1]]).view(2, 1, 2)
    b = torch.tensor([[1.0, -1.0], [0.0, 0.0]]).view(2, 1, 2)
    ia, ib, _ = mutual_nearest_neighbors(a, b)
    assert ia.tolist() == [0] and ib.tolist() == [0]


def test_bad_arguments():
    f = random_map()
    with pytest.raises(ValueError, match="method"):
        match_points(f, f, torch.zeros(1, 2), (48, 64), (48, 64), method="nn")
    with pytest.raises(ValueError, match="grid"):
        match_points(f, f, torch.zeros(1, 2), (48, 64), (48, 64), grid="patches")
    with pytest.raises(ValueError, match="channels"):
        match_points(f, random_map(c=8), torch.zeros(1, 2), (48, 64), (48, 64))
    assert match_points(f, f, torch.zeros(0, 2), (48, 64), (48, 64)).shape == (0, 2)
