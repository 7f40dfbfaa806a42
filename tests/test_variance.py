"""Noise-variance decomposition (paper §3.1): the pure function, the driver semantics, a tiny SD run, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift.analysis.variance import (
    GramAccumulator, VarianceResult, ddpm_add_noise, decompose, noise_variance_analysis, scaled_linear_alphas_cumprod,
    variance_fractions,
)


def _total(f) -> float:
    return f.eps + f.x0 + f.remaining


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- pure function
def test_features_that_are_the_noise_are_all_noise():
    eps, x0 = _randn(4, 8, 6, 6, seed=1), _randn(4, 8, 6, 6, seed=2)
    f = variance_fractions(3.0 * eps, eps, x0)
    assert f.eps == pytest.approx(1.0, abs=1e-9) and f.remaining == pytest.approx(0.0, abs=1e-9)
    assert f.a == pytest.approx(3.0)
    assert _total(f) == pytest.approx(1.0, abs=1e-12)


def test_features_that_are_the_clean_image_are_all_x0():
    eps, x0 = _randn(4, 8, 6, 6, seed=1), _randn(4, 8, 6, 6, seed=2)
    f = variance_fractions(-2.0 * x0, eps, x0)
    assert f.x0 > 0.99 and f.eps < 0.01 and f.remaining < 1e-3  # only the chance correlation with eps
    assert f.b == pytest.approx(-2.0, abs=0.05)
    assert _total(f) == pytest.approx(1.0, abs=1e-12)


def test_mixture_splits_variance_by_its_parts():
    eps, x0, other = (_randn(8, 16, 8, 8, seed=s) for s in (1, 2, 3))
    f = variance_fractions(2.0 * eps + 1.0 * x0 + 1.0 * other, eps, x0)  # variances 4 : 1 : 1
    assert f.eps == pytest.approx(4 / 6, abs=0.02)
    assert f.x0 == pytest.approx(1 / 6, abs=0.02)
    assert f.remaining == pytest.approx(1 / 6, abs=0.02)
    assert _total(f) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("center", ["channel", "global", "none"])
def test_fractions_sum_to_one_and_lie_in_unit_interval(center):
    for seed in range(5):
        ft, fe, f0 = (_randn(3, 5, 4, 4, seed=10 * seed + k) + k for k in range(3))
        f = variance_fractions(ft, fe, f0, center=center)
        assert _total(f) == pytest.approx(1.0, abs=1e-12)
        assert all(0.0 <= v <= 1.0 for v in (f.eps, f.x0, f.remaining))


def test_channel_centring_ignores_per_channel_offsets():
    eps, x0 = _randn(4, 3, 5, 5, seed=1), _randn(4, 3, 5, 5, seed=2)
    offset = torch.tensor([5.0, -3.0, 10.0]).view(1, 3, 1, 1)
    assert variance_fractions(eps + offset, eps, x0, "channel").eps == pytest.approx(1.0, abs=1e-9)
    assert variance_fractions(eps + offset, eps, x0, "none").eps < 0.2  # the raw second moment is mostly offset


def test_streaming_equals_one_shot():
    ft, fe, f0 = (_randn(6, 4, 3, 3, seed=s) for s in (1, 2, 3))
    ft = ft + 0.5 * fe + 2.0
    acc = GramAccumulator("channel")
    acc.update(ft[:2], fe[:2], f0[:2])
    acc.update(ft[2:], fe[2:], f0[2:])
    whole = variance_fractions(ft, fe, f0, "channel")
    assert acc.fractions().eps == pytest.approx(whole.eps, abs=1e-12)
    assert acc.fractions().x0 == pytest.approx(whole.x0, abs=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        acc.update(ft, fe[:, :2], f0)
    with pytest.raises(ValueError, match="zero variance"):
        variance_fractions(torch.ones(2, 2, 2, 2), fe[:2, :2, :2, :2], f0[:2, :2, :2, :2])


# ---------------------------------------------------------------------------------------------- driver semantics
def test_driver_uses_the_same_noise_and_a_noise_free_x0():
    """Identity 'features': F_t = sqrt(abar) x0 + sqrt(1-abar) eps, so the fractions must follow the schedule."""
    abar = scaled_linear_alphas_cumprod()
    x0 = _randn(8, 4, 32, 32, seed=5)
    seen = []

    def features(x, t):
        seen.append((t, x.clone()))
        return {"identity": x}

    ts = [0, 261, 500, 999]
    result = decompose([(x0, features)], ts, ddpm_add_noise(abar), t_noise=999, progress=False)
    eps = seen[1][1]
    var_x0, var_eps = float(x0.var()), float(eps.var())
    for row in result.rows:
        noise_var = float(1 - abar[row["t"]]) * var_eps
        expected_eps = noise_var / (noise_var + float(abar[row["t"]]) * var_x0)
        assert row["eps"] == pytest.approx(expected_eps, abs=0.01), row
        assert row["x0"] == pytest.approx(1 - expected_eps, abs=0.01), row
        assert row["remaining"] == pytest.approx(0.0, abs=2e-3), row  # only chance correlations of x0 and eps
    assert [t for t, _ in seen] == [0, 999, *ts]  # F_0 at t=0, pure noise at T-1, then every t
    assert torch.equal(seen[0][1], x0)  # x_t = x0 exactly for F_0: no noise added
    assert torch.allclose(seen[-1][1], abar[999].sqrt().float() * x0 + (1 - abar[999]).sqrt().float() * eps, atol=1e-6)


def test_result_table_files_and_plot(tmp_path):
    abar = scaled_linear_alphas_cumprod()
    x0 = _randn(2, 3, 8, 8, seed=1)
    result = decompose([(x0, lambda x, t: {"a": x, "b": x.pow(2)})], [0, 300, 999], ddpm_add_noise(abar),
                       draws=2, progress=False)
    assert result.taps() == ["a", "b"] and len(result.rows) == 6
    series = result.series("b")
    assert series["t"] == [0, 300, 999]
    assert all(abs(e + x + r - 1) < 1e-9 for e, x, r in zip(series["eps"], series["x0"], series["remaining"]))
    result.save_json(tmp_path / "v.json")
    result.save_csv(tmp_path / "v.csv")
    png = result.plot(tmp_path / "v.png")
    assert json.loads((tmp_path / "v.json").read_text())["config"]["draws"] == 2
    assert (tmp_path / "v.csv").read_text().splitlines()[0] == "tap,t,eps,x0,remaining,a,b"
    assert Image.open(png).size[0] > 100
    assert isinstance(VarianceResult().to_dict(), dict)


# ---------------------------------------------------------------------------------------------- tiny SD model
def test_tiny_sd_model(tiny_backbone):
    images = _randn(2, 3, 64, 64, seed=3).clamp(-1, 1)
    result = noise_variance_analysis(tiny_backbone, images, [0, 999], taps="mid,us6", batch_size=2, progress=False)
    assert result.taps() == ["mid", "us6"] and len(result.rows) == 4
    for row in result.rows:
        assert row["eps"] + row["x0"] + row["remaining"] == pytest.approx(1.0, abs=1e-9)
    by = {(r["tap"], r["t"]): r for r in result.rows}
    # t=999: x_t = 0.07 x0 + 0.998 eps at the same timestep as the pure-noise pass -> almost all noise.
    # (The random VAE's latents are tiny, std ~0.04, so even t=0 is noise-heavy; only the trend is checked.)
    assert by[("us6", 999)]["eps"] > 0.9
    assert by[("us6", 0)]["x0"] > by[("us6", 999)]["x0"]
    assert by[("us6", 0)]["eps"] < by[("us6", 999)]["eps"]
    assert result.config["taps"] == ["mid", "us6"] and result.config["num_images"] == 2


def test_cli_variance(tmp_path, tiny_pipeline_dir):
    from cleandift.cli.main import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    code = main(["analyze", "variance", "--images", str(folder), "--model", str(tiny_pipeline_dir), "--device", "cpu",
                 "--taps", "us6", "--ts", "0,999", "--size", "64", "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads((out / "variance.json").read_text())
    assert [r["t"] for r in data["rows"]] == [0, 999]
    assert (out / "variance.png").is_file() and (out / "variance.csv").is_file()
    assert main(["analyze", "variance", "--images", str(tmp_path / "none"), "--model", str(tiny_pipeline_dir),
                 "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["analyze", "variance", "--images", str(folder), "--ts", "0,1200", "--out", str(out)])


def test_parse_timesteps():
    from cleandift.cli.analyze import parse_timesteps

    assert parse_timesteps("0,50,100:400:100,999") == [0, 50, 100, 200, 300, 999]
    assert parse_timesteps("300, 100,100") == [100, 300]
    for bad in ("", "a", "0:10:0", "1000"):
        with pytest.raises(Exception):
            parse_timesteps(bad)
