"""The noise-variance analysis (paper §3.1) runs on every family through ``backbone.run_taps``."""

from __future__ import annotations

import pytest
import torch

from cleandift import load_backbone
from cleandift.analysis.variance import noise_variance_analysis
from cleandift.testing import tiny_flux, tiny_pixart


@pytest.mark.parametrize("builder", [tiny_flux, tiny_pixart], ids=["flux", "pixart"])
def test_variance_decomposition_on_transformer_families(builder, tmp_path):
    backbone = load_backbone(str(builder.save(tmp_path)))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tap = backbone.default_feature_taps[0]
    result = noise_variance_analysis(backbone, images, ts=[0, 500], batch_size=2, progress=False)
    series = result.series(tap)
    assert series["t"] == [0, 500] and result.config["backbone"]["family"] == backbone.family
    for key in ("eps", "x0", "remaining"):
        assert all(0.0 <= v <= 1.0 + 1e-6 for v in series[key]), (key, series[key])
    # more noise, more of the feature variance explained by the noise draw
    assert series["eps"][1] > series["eps"][0]


def test_knn_probe_reads_the_family_default_tap_and_records_it(tmp_path):
    """``eval knn`` without ``--taps`` on a transformer family: its feature tap, named in the results."""
    import argparse
    import json

    from cleandift.cli.eval_probes import add_probe_commands

    from test_knn import COLOURS, write_image_folder

    folder = tiny_flux.save(tmp_path / "flux")
    root = write_image_folder(tmp_path / "data", {"train": 1, "val": 1}, classes=dict(list(COLOURS.items())[:2]))
    parser = argparse.ArgumentParser()
    add_probe_commands(parser.add_subparsers())
    out = tmp_path / "knn.json"
    args = parser.parse_args(["knn", "--root", str(root), "--model", str(folder), "--device", "cpu", "--mode",
                              "noisy", "--t", "200", "--ensemble", "1", "--size", "32", "--k", "1", "--out", str(out),
                              "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["num_samples"] == 2
    assert json.dumps(result["config"]).count('"block2"') >= 1  # tiny Flux's middle block, not SD's us6
