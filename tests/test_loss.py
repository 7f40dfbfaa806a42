"""Alignment loss: per-tap negative cosine over channels, mean over (N, HW), unweighted sum over taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cleandift.errors import ConfigError
from cleandift.loss import alignment_loss


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = {"mid": torch.randn(6, 4, 32, generator=g), "us6": torch.randn(6, 16, 8, generator=g)}
    target = {"mid": torch.randn(6, 4, 32, generator=g), "us6": torch.randn(6, 16, 8, generator=g)}
    return pred, target


def test_cosine_matches_manual_reduction():
    pred, target = _pair()
    total, per_tap = alignment_loss(pred, target)
    for name in pred:
        p, t = pred[name], target[name]
        manual = -((p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1))).mean()
        torch.testing.assert_close(per_tap[name], manual)
    torch.testing.assert_close(total, per_tap["mid"] + per_tap["us6"])  # unweighted, whatever the resolution


def test_identical_features_give_minus_one_per_tap():
    pred, _ = _pair()
    total, per_tap = alignment_loss(pred, {k: 3.0 * v for k, v in pred.items()})  # cosine ignores the scale
    assert all(v.item() == pytest.approx(-1.0, abs=1e-6) for v in per_tap.values())
    assert total.item() == pytest.approx(-2.0, abs=1e-6)


@pytest.mark.parametrize("kind, fn", [("l1", F.l1_loss), ("mse", F.mse_loss)])
def test_l1_and_mse_alternatives(kind, fn):
    pred, target = _pair(1)
    total, per_tap = alignment_loss(pred, target, kind)
    for name in pred:
        torch.testing.assert_close(per_tap[name], fn(pred[name], target[name]))
    torch.testing.assert_close(total, sum(per_tap.values()))


def test_no_gradient_into_target_and_fp32_result():
    pred, target = _pair(2)
    pred = {k: v.to(torch.bfloat16).requires_grad_(True) for k, v in pred.items()}
    target = {k: v.requires_grad_(True) for k, v in target.items()}
    total, _ = alignment_loss(pred, target)
    assert total.dtype == torch.float32
    total.backward()
    assert all(v.grad is not None for v in pred.values())
    assert all(v.grad is None for v in target.values())


def test_bad_inputs():
    pred, target = _pair()
    with pytest.raises(ConfigError, match="cosine, l1, mse"):
        alignment_loss(pred, target, "huber")
    with pytest.raises(ValueError, match="taps"):
        alignment_loss(pred, {"mid": target["mid"]})
    with pytest.raises(ValueError, match="us6"):
        alignment_loss(pred, {"mid": target["mid"], "us6": target["us6"][:, :3]})
