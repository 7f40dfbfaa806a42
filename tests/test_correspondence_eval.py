"""Correspondence runner: known answers (synthetic descriptor), cache and resume, presets, CLI end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from correspondence_data import KPS, BlockDescriptor, write_pfpascal, write_spair

from cleandift.errors import ConfigError, DatasetError
from cleandift.eval.cache import CacheMismatchError, FeatureCache
from cleandift.eval.correspondence import evaluate_pairs, run_correspondence
from cleandift.eval.descriptors import DenseDescriptor, DiffusionDescriptor, concat_taps
from cleandift.eval.presets import PRESETS, preset_differences, resolve_settings
from cleandift.eval.spair import read_spair


@pytest.fixture
def spair(tmp_path):
    return write_spair(tmp_path / "SPair-71k")


def pck_values(results):
    return {k: v for k, v in results.items() if k.startswith("pck@")}


@pytest.mark.parametrize("matching", [
    dict(grid="pixels", source="bilinear", method="argmax"),  # DIFT
    dict(grid="cells", source="cell", method="argmax"),  # SD-DINO
    dict(grid="cells", source="cell", method="soft-argmax", window=5, temperature=0.02),  # TLFR
])
def test_identical_and_mirrored_pairs_are_perfect(spair, tmp_path, matching):
    settings = resolve_settings("dift-spair", **matching)
    descriptor = BlockDescriptor()
    result = run_correspondence(settings, spair, out=tmp_path / "r.json", descriptor=descriptor,
                                progress=False)
    values = pck_values(result.results)
    # cells predict block centres, <= 0.71 px from the integer keypoints: above alpha=0.01 of 64 px only
    exact = {k: v for k, v in values.items() if matching["grid"] == "pixels" or not k.startswith("pck@0.01")}
    assert all(v == 1.0 for v in exact.values()), values
    assert result.results["n_pairs"] == 4 and result.results["n_keypoints"] == 16
    assert set(result.per_category) == {"cat", "dog"}
    assert descriptor.calls == 4  # 4 distinct images, each described once although 'a' is in 4 pairs
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["settings"]["grid"] == matching["grid"] and saved["descriptor"]["kind"] == "block-colour"
    assert saved["dataset"]["categories"] == ["cat", "dog"]


def test_a_wrong_descriptor_is_scored_low(spair):
    class Constant(BlockDescriptor):
        def __call__(self, images, prompts=None):
            return torch.ones(images.shape[0], 3, 6, 8)

    result = evaluate_pairs(read_spair(spair), Constant(), resolve_settings("dift-spair"), progress=False)
    assert result.results["pck@0.10/bbox/per-point"] < 50  # every prediction is the top-left pixel


def test_cache_resume_after_interruption(spair, tmp_path):
    settings = resolve_settings("dift-spair")
    pairs = read_spair(spair)

    class Flaky(BlockDescriptor):
        def __call__(self, images, prompts=None):
            if self.calls >= 2:
                raise KeyboardInterrupt
            return super().__call__(images, prompts)

    with pytest.raises(KeyboardInterrupt):
        evaluate_pairs(pairs, Flaky(), settings, cache_dir=tmp_path / "cache", progress=False)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob(".tmp-*"))
    resumed = BlockDescriptor()
    result = evaluate_pairs(pairs, resumed, settings, cache_dir=tmp_path / "cache", progress=False)
    assert resumed.calls == 2 and result.timing["images_from_cache"] >= 2
    again = BlockDescriptor()
    evaluate_pairs(pairs, again, settings, cache_dir=tmp_path / "cache", progress=False)
    assert again.calls == 0


def test_cache_from_other_settings_is_refused(tmp_path):
    a = FeatureCache(tmp_path, {"model": "a"})
    b = FeatureCache(tmp_path, {"model": "b"})
    assert a.folder != b.folder  # different settings never share files
    a.put("cat/x", torch.ones(2, 3, 3))
    assert torch.equal(a.get("cat/x"), torch.ones(2, 3, 3)) and b.get("cat/x") is None
    b.path("cat/x").parent.mkdir(parents=True)
    shutil.copy(a.path("cat/x"), b.path("cat/x"))  # a file copied into another settings' folder
    message = r"x\.safetensors: cached features were computed with other settings"
    with pytest.raises(CacheMismatchError, match=message):
        b.get("cat/x")
    # a hand-edited settings.json in the folder is refused too, naming the file and the key
    (b.folder / "settings.json").write_text(json.dumps({"format": "x", "features": {"model": "c"}}))
    with pytest.raises(CacheMismatchError, match=r"settings\.json: this cache folder holds features"):
        FeatureCache(tmp_path, {"model": "b"})
    # an id that maps to another id's file is caught by the stored image id
    a.put("cat/y", torch.zeros(1, 1, 1))
    shutil.copy(a.path("cat/y"), a.path("cat/z"))
    with pytest.raises(CacheMismatchError, match="holds features of image 'cat/y'"):
        a.get("cat/z")


def test_settings_change_the_cache_key(spair, tmp_path):
    pairs = read_spair(spair)
    cache = tmp_path / "cache"
    d1 = BlockDescriptor()
    evaluate_pairs(pairs, d1, resolve_settings("dift-spair"), cache_dir=cache, progress=False)
    d2 = BlockDescriptor()
    other = resolve_settings("dift-spair", prompt="a {category}")
    evaluate_pairs(pairs, d2, other, cache_dir=cache, progress=False)
    assert d1.calls == d2.calls == 4  # another prompt template -> other features, no reuse
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_image_size_must_match_the_annotation(spair):
    path = sorted((spair / "PairAnnotation" / "test").glob("*.json"))[0]
    data = json.loads(path.read_text())
    data["src_imsize"] = [80, 60, 3]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"cat_a\.jpg: image is 64x48 but its annotation says 80x60"):
        evaluate_pairs(read_spair(spair), BlockDescriptor(), resolve_settings("dift-spair"), progress=False)


def test_pfpascal_reports_image_thresholds_only(tmp_path):
    root = write_pfpascal(tmp_path)
    settings = resolve_settings("dift-spair", dataset="pfpascal")
    result = run_correspondence(settings, root, descriptor=BlockDescriptor(), progress=False)
    keys = pck_values(result.results)
    assert keys and all("/img/" in k for k in keys) and all(v == 1.0 for v in keys.values())
    assert "PF-Pascal" in str(pytest.raises(ConfigError, resolve_settings, dataset="pfpascal",
                                            thresholds=("bbox",)).value)


def test_match_pair_hook_gets_context_and_flipped_features(spair):
    seen = {}

    class PairAware(BlockDescriptor):
        def match_pair(self, src, trg, src_xy, ctx):
            seen["ctx"] = ctx
            flipped = ctx.get_features(ctx.src_id, flipped=True)
            assert torch.equal(flipped, torch.flip(src, dims=[-1]))
            return ctx.extra["pair"].trg_kps.clone()  # an oracle

    d = PairAware()
    result = evaluate_pairs(read_spair(spair, categories=["cat"]), d, resolve_settings("dift-spair"),
                            progress=False)
    assert result.results["pck@0.01/bbox/per-point"] == 1.0
    ctx = seen["ctx"]
    assert ctx.category == "cat" and ctx.kps_ids == (0, 1, 2, 3) and ctx.src_size == (48, 64)
    assert ctx.extra["src_annotation"].name == "cat_a.json"
    assert ctx.extra["src_kps_all"].shape == (6, 2) and ctx.extra["src_kps_all"][:4].tolist() == \
        [[float(x), float(y)] for x, y in KPS]


def test_presets_are_explicit_and_validated():
    dift = resolve_settings("dift-spair")
    assert (dift.model, dift.mode, dift.t, dift.ensemble, dift.taps, dift.size, dift.resize, dift.prompt,
            dift.comparison, dift.grid, dift.method) == ("sd21", "noisy", 261, 8, ("us6",), 768, "stretch",
                                                         "a photo of a {category}", "<=", "pixels", "argmax")
    clean = resolve_settings("cleandift-spair")
    assert (clean.mode, clean.clean_timestep, clean.ensemble) == ("clean", 261.0, 1)
    assert clean.descriptor_settings()["clean_timestep"] == 261.0 and "t" not in clean.descriptor_settings()
    tlfr = resolve_settings("tlfr-zero-shot")
    assert (tlfr.method, tlfr.window, tlfr.temperature, tlfr.comparison, tlfr.grid) == \
        ("soft-argmax", 5, 0.02, "<", "cells")
    assert resolve_settings("sd-dino").fusion["pca_dims"] == (256, 256, 256)
    assert {"dift-spair", "cleandift-spair", "sd-dino", "tlfr-zero-shot"} <= set(PRESETS)
    assert preset_differences(resolve_settings("dift-spair", t=300, limit=3)) == {"t": (300, 261)}
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_settings("dift")
    with pytest.raises(ConfigError, match="unknown setting"):
        resolve_settings("dift-spair", temprature=0.1)
    with pytest.raises(ConfigError, match="comparison"):
        resolve_settings(comparison="<<")
    json.dumps(resolve_settings("sd-dino").as_dict())


@pytest.mark.slow
def test_diffusion_descriptor_on_the_tiny_model(tiny_backbone, tiny_images):
    from cleandift.extract import NoisyExtractor

    images = tiny_images[:, :, :64, :64].contiguous()
    extractor = NoisyExtractor(tiny_backbone, t=261, ensemble=2, taps=["us3", "us6"])
    d = DiffusionDescriptor(extractor, taps=("us3", "us6"), size=64, seed=5)
    assert isinstance(d, DenseDescriptor)
    both = d(images, ["a photo of a cat", "a photo of a dog"])
    one = d(images[1:], "a photo of a dog")
    assert torch.allclose(both[1:], one, atol=1e-5)  # batch- and order-independent (cache resume is exact)
    feats = extractor(images[:1], prompts="x", taps=["us3", "us6"])
    assert both.shape[1] == feats["us3"].shape[1] + feats["us6"].shape[1]
    assert both.shape[-2:] == feats["us6"].shape[-2:]  # the finest tap's resolution
    info = d.describe()
    assert info["taps"] == ["us3", "us6"] and info["extractor"]["t"] == 261
    assert info["weights"]["unet_fingerprint"]
    cat = concat_taps([torch.randn(1, 4, 2, 2), torch.randn(1, 3, 4, 4)])
    assert cat.shape == (1, 7, 4, 4) and torch.allclose(cat[:, 4:].norm(dim=1), torch.ones(1, 4, 4))


@pytest.mark.slow
def test_cli_eval_spair_end_to_end(spair, tiny_pipeline_dir, tmp_path, capsys):
    from cleandift.cli.main import main

    out = tmp_path / "results.json"
    argv = ["eval", "spair", "--root", str(spair), "--model", str(tiny_pipeline_dir), "--size", "64",
            "--ensemble", "2", "--categories", "cat", "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    for key in ("pck@0.10/bbox/per-point", "pck@0.10/bbox/per-image", "pck@0.10/img/per-point",
                "pck@0.10/img/per-image", "pck@0.01/bbox/per-point", "pck@0.15/img/per-image"):
        assert 0.0 <= data["results"][key] <= 1.0
    assert data["results"]["n_pairs"] == 2 and list(data["per_category"]) == ["cat"]
    s = data["settings"]
    assert (s["preset"], s["mode"], s["t"], s["ensemble"], s["size"], s["comparison"]) == \
           ("dift-spair", "noisy", 261, 2, 64, "<=")
    assert data["descriptor"]["extractor"]["mode"] == "noisy" and data["method"] == "noisy"
    assert data["protocol"]["values"].startswith("fraction")
    printed = capsys.readouterr().out
    assert "bbox/per-point" in printed and "cat" in printed
    # clean mode through the same command, resuming into its own cache folder
    out2 = tmp_path / "clean.json"
    assert main(argv[:-4] + ["--mode", "clean", "--out", str(out2), "--cache", str(tmp_path / "cache"),
                             "--label", "frozen"]) == 0
    clean = json.loads(out2.read_text())
    assert clean["settings"]["preset"] == "cleandift-spair" and clean["label"] == "frozen"
    assert clean["descriptor"]["extractor"]["mode"] == "clean"
    assert clean["method"] == "naive-clean"  # no --checkpoint: the frozen model, labelled as the baseline
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_cli_reports_dataset_errors(tmp_path, capsys):
    from cleandift.cli.main import main

    # the dataset is read before any model loads, so a bad --root fails fast (no weights needed)
    code = main(["eval", "spair", "--root", str(tmp_path / "missing"), "--model", "sd21"])
    assert code == 2 and "PairAnnotation/test: folder not found" in capsys.readouterr().err
