"""Result files name what produced them and use one unit; help texts say what each task needs (issue 13, item 20)."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from cleandift.eval.presets import feature_method


def _parser():
    from cleandift.cli.main import build_parser

    return build_parser()


def _help(*argv: str) -> str:
    parser = _parser()
    sub = parser
    for name in argv:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return sub.format_help()


def test_feature_method_names_the_baseline():
    assert feature_method("clean", None) == "naive-clean"
    assert feature_method("clean", "student.safetensors") == "clean"
    assert feature_method("noisy", "ignored.safetensors") == "noisy"
    assert feature_method("clean", None, descriptor="dinov2") == "dinov2"


def test_probe_root_help_names_each_tasks_dataset():
    assert "NYUv2" in _help("eval", "depth")
    for task, expected in (("seg", "VOC"), ("knn", "ImageFolder")):
        text = _help("eval", task)
        assert "NYUv2" not in text and expected in text


def test_viz_help_has_no_internal_issue_references():
    for sub in ("pca", "match", "heatmap", "curves"):
        assert "issue" not in _help("viz", sub).lower()
    assert "issue" not in _help("viz").lower()


def test_knn_clean_without_a_checkpoint_is_recorded_as_naive_clean(tmp_path, tiny_pipeline_dir, caplog):
    from test_knn import COLOURS, write_image_folder

    root = write_image_folder(tmp_path / "data", {"train": 1, "val": 1}, classes=dict(list(COLOURS.items())[:2]))
    common = ["eval", "knn", "--root", str(root), "--model", str(tiny_pipeline_dir), "--device", "cpu",
              "--taps", "us6", "--size", "64", "--k", "1", "--no-progress"]
    parser = _parser()
    out = tmp_path / "clean.json"
    args = parser.parse_args(common + ["--mode", "clean", "--label", "frozen", "--out", str(out)])
    with caplog.at_level(logging.WARNING):
        assert args.func(args) == 0
    assert "naive-clean" in caplog.text
    result = json.loads(out.read_text())
    assert result["mode"] == "naive-clean" and result["requested_mode"] == "clean" and result["label"] == "frozen"
    out2 = tmp_path / "naive.json"
    args = parser.parse_args(common + ["--mode", "naive", "--t", "261", "--out", str(out2)])
    assert args.func(args) == 0
    result2 = json.loads(out2.read_text())
    assert result2["mode"] == "naive-clean" and "label" not in result2
    # the same features (frozen model, clean image, timestep 261), so the same score under the same name
    assert result2["metrics"] == result["metrics"]


def test_correspondence_results_are_fractions_and_tables_percent():
    from cleandift.eval.correspondence import format_table
    from cleandift.eval.pck import PCK

    import torch

    metric = PCK(alphas=(0.1,), thresholds=("bbox",))
    metric.update(torch.tensor([[0.0, 0.0], [50.0, 0.0]]), torch.zeros(2, 2), bbox=[0, 0, 100, 100], category="c")
    results = metric.compute()
    assert results["pck@0.10/bbox/per-point"] == 0.5  # one of two keypoints, as a fraction
    table = format_table(results, metric.compute_per_category())
    assert "50.00" in table and "PCK %" in table


@pytest.mark.parametrize("path", ["docs/evaluation.md"])
def test_the_unit_convention_is_documented(path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / path).read_text(encoding="utf-8")
    assert "fraction in [0, 1]" in text and "naive-clean" in text
