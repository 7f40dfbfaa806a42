"""The family registry and presets: which module loads which pipeline, and what a gated model's error says."""

from __future__ import annotations

import json

import pytest

from cleandift.backbones.families import FAMILIES, family_for, get_family, pipeline_class_of
from cleandift.backbones.loading import _not_found_message
from cleandift.backbones.presets import PRESETS


def test_every_family_module_has_a_loader_and_serves_distinct_pipelines():
    seen = set()
    for family in FAMILIES:
        assert callable(family.loader())
        assert not seen & set(family.pipelines)
        seen |= set(family.pipelines)
    assert family_for("FluxPipeline").name == "flux" and family_for("StableDiffusionXLPipeline").name == "sdxl"
    assert family_for("SomethingElse") is None
    with pytest.raises(KeyError, match="known: stable-diffusion, sdxl"):
        get_family("dit")


def test_pipeline_class_is_read_from_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    assert pipeline_class_of(str(tmp_path), True) == "PixArtSigmaPipeline"
    (tmp_path / "model_index.json").unlink()
    assert pipeline_class_of(str(tmp_path), True) is None
    (tmp_path / "model_index.json").write_text("{broken")
    with pytest.raises(ValueError, match="model_index.json: not readable JSON"):
        pipeline_class_of(str(tmp_path), True)


def test_presets_cover_every_family_at_its_resolution():
    expected = {"sdxl": 1024, "sdxl-turbo": 512, "sd3-medium": 1024, "sd35-medium": 1024, "pixart-sigma": 1024,
                "pixart-sigma-512": 512, "flux-schnell": 1024, "flux-dev": 1024}
    assert {k: PRESETS[k].resolution for k in expected} == expected
    assert {k for k, p in PRESETS.items() if p.gated} == {"sd3-medium", "sd35-medium", "flux-dev"}


def test_a_gated_model_says_accept_the_licence_and_log_in():
    why = "GatedRepoError: 401 Client Error. Cannot access gated repo for url https://hf.co/black-forest-labs/..."
    msg = _not_found_message("flux-dev", {"black-forest-labs/FLUX.1-dev": why}, local_files_only=False)
    assert "black-forest-labs/FLUX.1-dev is a gated model: accept the licence" in msg and "log in" in msg
    plain = _not_found_message("sdxl", {"stabilityai/stable-diffusion-xl-base-1.0": "EntryNotFoundError: x"}, False)
    assert "gated" not in plain


def test_a_gated_preset_offline_names_the_licence_before_any_download(monkeypatch):
    from cleandift import load_backbone
    from cleandift.errors import BackboneNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone("flux-dev")
    text = str(info.value)
    assert "black-forest-labs/FLUX.1-dev is a gated model: accept the licence" in text
    assert "unset HF_HUB_OFFLINE" in text
