"""`benchmarks/mini_knn_readouts.py`: its splits never leak validation into a bank, and picks use validation only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
readouts = pytest.importorskip("mini_knn_readouts")


def test_validation_is_disjoint_from_every_bank_and_seeds_differ():
    splits, val = readouts.draw_splits(60_000, 10_000, [0, 1], bank=10_000, queries=2_000, val=2_000)
    assert len(set(val.tolist())) == 2_000 and int(val.min()) >= readouts.BANK_POOL
    for bank, queries in splits.values():
        assert len(set(bank.tolist())) == 10_000 and int(bank.max()) < readouts.BANK_POOL
        assert len(queries) == 2_000 and int(queries.max()) < 10_000
    assert not (splits[0][0] == splits[1][0]).all()
    with pytest.raises(ValueError, match="disjoint validation"):
        readouts.draw_splits(50_000, 10_000, [0], bank=10, queries=10, val=10)


def test_pick_uses_validation_scores_and_can_exclude_the_all_tap_row():
    rows = {"mid|avg": {"val": [80.0, 82.0], "test": [90.0, 90.0]},
            "us1|max": {"val": [85.0, 85.0], "test": [70.0, 70.0]},
            "all|avg": {"val": [88.0, 88.0], "test": [60.0, 60.0]}}
    assert readouts.pick(rows, ("avg", "max")) == "all|avg"
    assert readouts.pick(rows, ("avg", "max"), single_tap=True) == "us1|max"
    assert readouts.pick(rows, ("avg",), single_tap=True) == "mid|avg"
    assert readouts.mean_se([1.0, 3.0]) == (2.0, 1.0)
