"""Issue 13 item 19: the released students load by name from the hub cache, and their learned timestep is
what the Python API uses (before, ``CleanExtractor(backbone, unet=student)`` silently ran at 261).

The hub cache is built by the test (huggingface_hub's layout) with tiny checkpoints in the authors' key
layout; ``HF_HUB_OFFLINE=1`` (set by conftest) or a closed local port stands in for the hub.
"""

from __future__ import annotations

import time

import pytest
import torch
from hub_cache import closed_port, populate_hub_cache
from safetensors.torch import save_file

from cleandift import CleanExtractor, hub, load_student, read_checkpoint
from cleandift.errors import CheckpointNotFoundError
from cleandift.released import RELEASED, REPO_ID, released_student, resolve_checkpoint

LEARNED_T = 273.5
STUDENT = "unet_feature_extractor_cleandift."


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_checked", {})
    return cache


@pytest.fixture
def student_state(tiny_backbone):
    """The tiny U-Net's weights, moved off the base model and stored in bf16 (as the released files are)."""
    gen = torch.Generator().manual_seed(3)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
            for k, v in tiny_backbone.unet.state_dict().items()}


def _write_released(cache, student_state, tmp_path) -> None:
    """``cleandift_sd15_unet`` (plain U-Net keys) and ``cleandift_sd15_full`` (training-module keys + timestep)."""
    unet_file, full_file = tmp_path / "unet.safetensors", tmp_path / "full.safetensors"
    save_file(student_state, str(unet_file))
    full = {STUDENT + k: v for k, v in student_state.items()}
    full["timestep"] = torch.tensor(LEARNED_T)
    full["time_emb.weight"] = torch.randn(4, 1)
    save_file(full, str(full_file))
    populate_hub_cache(cache, REPO_ID, {"cleandift_sd15_unet.safetensors": unet_file,
                                        "cleandift_sd15_full.safetensors": full_file})


def test_name_table_matches_the_hub_files():
    assert {name: (s.filename, s.base) for name, s in RELEASED.items()} == {
        "cleandift-sd15": ("cleandift_sd15_unet.safetensors", "sd15"),
        "cleandift-sd21": ("cleandift_sd21_unet.safetensors", "sd21"),
        "cleandift-sd15-full": ("cleandift_sd15_full.safetensors", "sd15"),
        "cleandift-sd21-full": ("cleandift_sd21_full.safetensors", "sd21"),
    }
    assert REPO_ID == "CompVis/cleandift"
    assert released_student("CleanDIFT-SD21") is RELEASED["cleandift-sd21"]
    assert released_student("cleandift_sd21_unet.safetensors") is None


def test_full_release_by_name_uses_its_learned_timestep(hub_cache, student_state, tmp_path, tiny_backbone,
                                                        tiny_images):
    _write_released(hub_cache, student_state, tmp_path)
    ckpt = read_checkpoint("cleandift-sd15-full")
    assert ckpt.format == "full" and ckpt.timestep == LEARNED_T
    assert ckpt.source.startswith(str(hub_cache)) and ckpt.source.endswith("cleandift_sd15_full.safetensors")

    student, _ = load_student(tiny_backbone.unet, "cleandift-sd15-full")
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, student_state[name].float(), rtol=0, atol=0, msg=name)
    extractor = CleanExtractor(tiny_backbone, unet=student, taps="us6")
    assert extractor.timestep == LEARNED_T  # was 261 whatever the checkpoint said
    feats = extractor(tiny_images)["us6"]
    torch.testing.assert_close(feats, CleanExtractor(tiny_backbone, unet=student, timestep=LEARNED_T,
                                                     taps="us6")(tiny_images)["us6"], rtol=0, atol=0)
    at_261 = CleanExtractor(tiny_backbone, unet=student, timestep=261, taps="us6")(tiny_images)["us6"]
    assert (feats - at_261).abs().max() > 1e-4  # the timestep really reaches the U-Net


def test_unet_release_has_no_timestep_and_runs_at_261(hub_cache, student_state, tmp_path, tiny_backbone):
    _write_released(hub_cache, student_state, tmp_path)
    student, ckpt = load_student(tiny_backbone.unet, "cleandift-sd15")
    assert ckpt.format == "unet" and ckpt.timestep is None
    assert CleanExtractor(tiny_backbone, unet=student).timestep == 261.0
    assert CleanExtractor(tiny_backbone, unet=student, timestep=100).timestep == 100.0  # explicit wins
    assert CleanExtractor(tiny_backbone).timestep == 261.0  # frozen U-Net: naive-clean default unchanged


def test_cli_extract_with_a_released_name(hub_cache, student_state, tmp_path, tiny_pipeline_dir):
    from PIL import Image

    from cleandift.cli.main import main
    from cleandift.feature_files import load_features

    _write_released(hub_cache, student_state, tmp_path)
    Image.new("RGB", (40, 40), (10, 120, 200)).save(tmp_path / "a.png")
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(tmp_path / "a.png"), "--model", str(tiny_pipeline_dir), "--checkpoint",
                 "cleandift-sd15-full", "--taps", "us6", "--out", str(out)]) == 0
    _, meta = load_features(out)
    assert meta["settings"]["timestep"] == LEARNED_T


def test_offline_and_not_cached_fails_fast_with_the_fix(hub_cache, monkeypatch):
    monkeypatch.setattr("cleandift.hub._head", _must_not_be_called)
    start = time.perf_counter()
    with pytest.raises(CheckpointNotFoundError) as info:
        read_checkpoint("cleandift-sd21")
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert message.startswith("--checkpoint cleandift-sd21: CompVis/cleandift/cleandift_sd21_unet.safetensors")
    assert str(hub_cache) in message and "HF_HUB_OFFLINE is set" in message and "unset HF_HUB_OFFLINE" in message


def test_unreachable_hub_and_not_cached_fails_fast(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.perf_counter()
    with pytest.raises(CheckpointNotFoundError, match="the Hugging Face hub cannot be reached .*Connect"):
        resolve_checkpoint("cleandift-sd15-full")
    assert time.perf_counter() - start < 2.0


def test_not_cached_and_online_downloads_once_through_the_hub(hub_cache, monkeypatch, tmp_path):
    calls = []

    def fake_download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(populate_hub_cache(hub_cache, repo_id, {filename: b"weights"}) / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("cleandift.released.hub_unreachable_reason", lambda: None)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    first = resolve_checkpoint("cleandift-sd21-full")
    second = resolve_checkpoint("cleandift-sd21-full")  # now from the cache: no second download
    assert first == second and first.read_bytes() == b"weights"
    assert calls == [("CompVis/cleandift", "cleandift_sd21_full.safetensors")]


def test_a_local_path_with_a_release_name_wins(hub_cache, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cleandift-sd15").mkdir()
    assert released_student("cleandift-sd15") is None
    assert resolve_checkpoint("cleandift-sd15") == tmp_path.joinpath("cleandift-sd15").relative_to(tmp_path)


def _must_not_be_called(*_args, **_kwargs):
    raise AssertionError("the hub must not be asked")
