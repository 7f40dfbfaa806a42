"""`benchmarks/bench_lora.py`: both cases run in their own process and report positive numbers; LoRA trains far less."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_lora")


def test_full_and_lora_cases_report_positive_numbers_and_lora_trains_far_fewer_parameters():
    # rank 4: the tiny U-Net's widths are 32-64, so the paper's rank 64 would be as wide as the layers themselves
    args = bench.build_parser().parse_args([
        "--arch", "tiny-sd15", "--size", "64", "--batch-size", "1", "--num-timesteps", "2", "--rank", "4",
        "--warmup", "1", "--repeats", "1", "--rounds", "1", "--threads", "1", "--cases", "full,lora", "--quiet"])
    args.min_available_gb = args.lora_min_available_gb = 0.0
    result = bench.run_benchmark(args, log=lambda msg: None)

    rows = {row["case"]: row for row in result["rows"]}
    assert set(rows) == {"full", "lora"}
    for row in rows.values():
        assert not row["failed"], row
        for key in ("median_s", "min_s", "median_peak_mb", "max_peak_mb", "rss_after_build_mb",
                    "rss_between_steps_mb", "adam_state_mb", "trainable_params"):
            assert row[key] > 0, (row["case"], key, row[key])
        assert row["steps"] == 1
    # each case ran in its own process (distinct pids are not recorded; distinct runs are)
    assert [r["case"] for r in result["runs"]] == ["full", "lora"]
    full, lora = rows["full"], rows["lora"]
    # the student part: the whole U-Net copy vs the adapters only; the heads are the same in both cases
    assert lora["heads_params"] == full["heads_params"]
    assert lora["student_params"] * 10 < full["student_params"]
    assert lora["trainable_params"] < full["trainable_params"] - 0.9 * full["student_params"]

    text = bench.format_report(result, args, "python benchmarks/bench_lora.py ...")
    assert "| full | fp32 |" in text and "| lora | fp32 |" in text and "lora / full: time" in text
