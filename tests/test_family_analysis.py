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
