"""PCK: hand-computed cases (boundary, aggregation, padding), labels, and a slow reference loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cleandift.eval.pck import PCK, keypoint_mask, pck, pck_correct, pck_key, pck_threshold


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_perfect_predictions_give_1_everywhere():
    gt = t([[10, 10], [20, 30], [5, 7]])
    metric = PCK()
    metric.update(gt.clone(), gt, bbox=[0, 0, 40, 40], image_size=(50, 60), category="cat")
    out = metric.compute()
    pck_values = {k: v for k, v in out.items() if k.startswith("pck@")}
    assert len(pck_values) == 4 * 2 * 2
    assert all(v == 1.0 for v in pck_values.values())
    assert out["n_pairs"] == 1 and out["n_keypoints"] == 3


def test_point_exactly_on_threshold_flips_between_le_and_lt():
    gt, pred = t([[0, 0]]), t([[3, 4]])  # distance exactly 5
    thr = pck_threshold("bbox", bbox=[10, 10, 60, 30])  # max(50, 20) = 50 -> 5 / 50 = 0.1
    assert thr.item() == 50
    assert pck_correct(pred, gt, thr, alpha=0.1, comparison="<=").tolist() == [True]
    assert pck_correct(pred, gt, thr, alpha=0.1, comparison="<").tolist() == [False]
    # same through the metric, for both threshold kinds (image max side 50 as well)
    for comparison, expected in (("<=", 1.0), ("<", 0.0)):
        m = PCK(alphas=(0.1,), comparison=comparison)
        m.update(pred, gt, bbox=[10, 10, 60, 30], image_size=(40, 50))
        r = m.compute()
        assert r["pck@0.10/bbox/per-point"] == expected
        assert r["pck@0.10/img/per-point"] == expected


def test_per_point_and_per_image_differ_as_computed_by_hand():
    m = PCK(alphas=(0.1,), thresholds=("bbox",))
    gt1 = t([[0, 0], [10, 0], [20, 0], [30, 0]])
    pred1 = gt1 + t([[0, 0], [1, 0], [0, 2], [50, 0]])  # 3 of 4 within 10 px (bbox side 100)
    m.update(pred1, gt1, bbox=[0, 0, 100, 100], category="cat")
    m.update(t([[0, 0]]), t([[50, 50]]), bbox=[0, 0, 100, 100], category="dog")  # 0 of 1
    r = m.compute()
    assert r["pck@0.10/bbox/per-point"] == pytest.approx(3 / 5)
    assert r["pck@0.10/bbox/per-image"] == pytest.approx((0.75 + 0.0) / 2)
    per_cat = m.compute_per_category()
    assert per_cat["cat"]["pck@0.10/bbox/per-point"] == pytest.approx(0.75)
    assert per_cat["dog"]["pck@0.10/bbox/per-image"] == 0.0
    assert per_cat["cat"]["n_keypoints"] == 4 and per_cat["dog"]["n_pairs"] == 1


def test_bbox_and_image_thresholds_differ():
    m = PCK(alphas=(0.1,))
    # error 8 px; bbox side 50 -> 5 px threshold (wrong); image side 200 -> 20 px (right)
    m.update(t([[8, 0]]), t([[0, 0]]), bbox=[0, 0, 50, 40], image_size=(100, 200))
    r = m.compute()
    assert r["pck@0.10/bbox/per-point"] == 0.0
    assert r["pck@0.10/img/per-point"] == 1.0


def test_padded_and_invisible_keypoints_are_excluded():
    gt = t([[[10, 10], [-1, -1], [float("nan"), float("nan")], [30, 30]],
            [[-1, -1], [-1, -1], [-1, -1], [-1, -1]]])  # second pair: all padding
    pred = t([[[10, 10], [-1, -1], [0, 0], [90, 90]],
              [[-1, -1], [-1, -1], [-1, -1], [-1, -1]]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, True]])
    assert keypoint_mask(gt).tolist() == [[True, False, False, True], [False] * 4]
    # the padded prediction matches the padded "ground truth" exactly, yet is not counted as correct
    expected = [[True, False, False, False], [False] * 4]
    assert pck_correct(pred, gt, 100.0, 0.1, valid=valid).tolist() == expected
    m = PCK(alphas=(0.1,), thresholds=("bbox",))
    m.update(pred, gt, bbox=[[0, 0, 100, 100]] * 2, valid=valid, category=["a", "b"])
    r = m.compute()
    assert r["n_keypoints"] == 2
    assert r["pck@0.10/bbox/per-point"] == 0.5
    assert r["pck@0.10/bbox/per-image"] == 0.5  # the all-padding pair adds nothing
    assert math.isnan(m.compute_per_category()["b"]["pck@0.10/bbox/per-image"])
    # an explicit mask removes a real keypoint too
    m2 = PCK(alphas=(0.1,), thresholds=("bbox",))
    m2.update(pred[0], gt[0], bbox=[0, 0, 100, 100], valid=torch.tensor([True, True, True, False]))
    assert m2.compute()["pck@0.10/bbox/per-point"] == 1.0 and m2.compute()["n_keypoints"] == 1


def test_labels_are_unambiguous():
    assert pck_key(0.1, "bbox", "per-point") == "pck@0.10/bbox/per-point"
    assert pck_key(0.01, "img", "per-image") == "pck@0.01/img/per-image"
    assert pck_key(0.15, "img", "per-image") == "pck@0.15/img/per-image"
    keys = set(PCK().compute())
    for a in ("0.01", "0.05", "0.10", "0.15"):
        for kind in ("bbox", "img"):
            for avg in ("per-point", "per-image"):
                assert f"pck@{a}/{kind}/{avg}" in keys


def test_functional_matches_a_slow_reference_loop():
    rng = np.random.default_rng(0)
    b, n = 7, 9
    gt = rng.uniform(0, 100, size=(b, n, 2))
    pred = gt + rng.normal(0, 8, size=(b, n, 2))
    gt[rng.uniform(size=(b, n)) < 0.2] = -1  # padding
    boxes = np.concatenate([rng.uniform(0, 20, (b, 2)), rng.uniform(40, 100, (b, 2))], 1)
    sizes = rng.integers(60, 200, size=(b, 2))
    for kind in ("bbox", "img"):
        for alpha in (0.05, 0.1):
            for comparison in ("<=", "<"):
                correct, total, per_pair = 0, 0, []
                for i in range(b):
                    box_side = max(boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1])
                    thr = box_side if kind == "bbox" else sizes[i].max()
                    c = k = 0
                    for j in range(n):
                        if gt[i, j, 0] < 0:
                            continue
                        d = math.dist(pred[i, j], gt[i, j]) / thr
                        c += (d <= alpha) if comparison == "<=" else (d < alpha)
                        k += 1
                    correct, total = correct + c, total + k
                    if k:
                        per_pair.append(c / k)
                m = PCK(alphas=(alpha,), thresholds=(kind,), comparison=comparison)
                m.update(torch.tensor(pred), torch.tensor(gt), bbox=torch.tensor(boxes),
                         image_size=torch.tensor(sizes))
                r = m.compute()
                assert r[pck_key(alpha, kind, "per-point")] == pytest.approx(correct / total)
                assert r[pck_key(alpha, kind, "per-image")] == pytest.approx(np.mean(per_pair))
                thr_t = pck_threshold(kind, bbox=torch.tensor(boxes), image_size=torch.tensor(sizes))
                assert pck(torch.tensor(pred), torch.tensor(gt), thr_t, alpha, comparison) == \
                    pytest.approx(correct / total)


def test_update_in_batches_equals_one_update():
    rng = np.random.default_rng(1)
    gt = torch.tensor(rng.uniform(0, 50, (6, 5, 2)))
    pred = gt + torch.tensor(rng.normal(0, 4, (6, 5, 2)))
    whole, parts = PCK(), PCK()
    kw = dict(bbox=[[0, 0, 50, 50]] * 6, image_size=[[60, 80]] * 6)
    whole.update(pred, gt, **kw)
    for i in range(6):
        parts.update(pred[i], gt[i], bbox=[0, 0, 50, 50], image_size=(60, 80))
    assert whole.compute() == parts.compute()
    parts.reset()
    assert parts.compute()["n_pairs"] == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="comparison"):
        PCK(comparison="=<")
    with pytest.raises(ValueError, match="thresholds"):
        PCK(thresholds=("box",))
    with pytest.raises(ValueError, match="bbox"):
        PCK().update(t([[0, 0]]), t([[0, 0]]), image_size=(10, 10))
    with pytest.raises(ValueError, match="positive"):
        pck_threshold("bbox", bbox=[5, 5, 5, 5])
    with pytest.raises(ValueError, match="N, 2"):
        pck_correct(t([[0, 0]]), t([[0, 0], [1, 1]]), 10.0)
    with pytest.raises(ValueError, match="categories"):
        PCK(thresholds=("img",)).update(t([[[0, 0]]] * 2), t([[[0, 0]]] * 2), image_size=(9, 9),
                                        category=["a"])
