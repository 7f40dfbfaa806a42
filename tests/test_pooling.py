"""kNN readouts: each checked against values worked out by hand on a 1x2x2x2 map."""

from __future__ import annotations

import math

import pytest
import torch

from cleandift.eval.pooling import GLOBAL_READOUTS, READOUTS, pool_map

# channel 0 = [[1, 2], [3, 6]], channel 1 = [[0, 0], [0, 4]]
MAP = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [0.0, 4.0]]]])


def test_avg_and_max_by_hand():
    assert pool_map(MAP, "avg").tolist() == [[3.0, 1.0]]
    assert pool_map(MAP, "max").tolist() == [[6.0, 4.0]]


def test_joint_readouts_normalise_each_part():
    # avg = (3, 1) / sqrt(10); max = (6, 4) / sqrt(52)
    got = pool_map(MAP, "avg+max")[0]
    want = [3 / math.sqrt(10), 1 / math.sqrt(10), 6 / math.sqrt(52), 4 / math.sqrt(52)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # population std: channel 0 deviations (-2, -1, 0, 3) -> var 14/4; channel 1 (-1, -1, -1, 3) -> var 12/4
    std = (math.sqrt(3.5), math.sqrt(3.0))
    got = pool_map(MAP, "avg+std")[0]
    norm = math.hypot(*std)
    assert got[2:].tolist() == pytest.approx([std[0] / norm, std[1] / norm], rel=1e-6)


def test_grid_readouts_keep_layout():
    assert pool_map(MAP, "grid2").tolist() == [[1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0]]
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert pool_map(x, "grid2").tolist() == [[2.5, 4.5, 10.5, 12.5]]  # means of the four 2x2 quadrants
    assert pool_map(x, "grid4").tolist() == [list(range(16))]
    flipped = pool_map(x.flip(-1), "grid2")
    assert not torch.equal(flipped, pool_map(x, "grid2"))
    assert torch.equal(pool_map(x.flip(-1), "avg"), pool_map(x, "avg"))  # global pooling forgets layout


def test_every_readout_is_float32_and_batched():
    x = torch.randn(3, 5, 8, 8, dtype=torch.float16)
    dims = {"avg": 5, "max": 5, "avg+max": 10, "avg+std": 10, "grid2": 20, "grid4": 80}
    assert set(dims) == set(READOUTS) and set(GLOBAL_READOUTS) < set(READOUTS)
    for readout, dim in dims.items():
        out = pool_map(x, readout)
        assert out.shape == (3, dim) and out.dtype == torch.float32


def test_bad_readout_and_shape_are_clear_errors():
    with pytest.raises(ValueError, match="unknown readout 'median'"):
        pool_map(MAP, "median")
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        pool_map(MAP[0], "avg")
