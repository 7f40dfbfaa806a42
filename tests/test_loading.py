"""Loading backbones the way users do: folders, presets, single files, and the errors when it fails."""

from __future__ import annotations

import pytest
import torch

from cleandift import load_backbone
from cleandift.backbones.presets import PRESETS
from cleandift.errors import BackboneNotFoundError
from cleandift.extract import CleanExtractor


def test_folder_round_trip_gives_identical_weights(tiny_pipeline_dir):
    from cleandift.backbones.random_init import build_random_backbone

    fresh = build_random_backbone("tiny-sd15", seed=0)
    loaded = load_backbone(str(tiny_pipeline_dir))
    for (name, a), (_, b) in zip(fresh.unet.state_dict().items(), loaded.unet.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert loaded.resolution == 128 and loaded.latent_factor == 8
    assert loaded.scaling_factor == pytest.approx(0.18215)


def test_dtype_and_device_come_from_the_caller(tiny_pipeline_dir):
    backbone = load_backbone(str(tiny_pipeline_dir), dtype=torch.bfloat16, device="cpu")
    assert backbone.dtype == torch.bfloat16 and backbone.device.type == "cpu"
    assert next(backbone.vae.parameters()).dtype == torch.bfloat16


def test_sd21_like_folder_loads(tiny_sd21_backbone):
    assert tiny_sd21_backbone.unet.config.use_linear_projection
    assert tiny_sd21_backbone.encode_prompts("x", 1).hidden_states.shape == (1, 77, 48)


def test_preset_offline_error_lists_sources_and_fixes(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone("sd21", local_files_only=True)
    message = str(info.value)
    for source in PRESETS["sd21"].sources:
        assert source in message
    assert "--model /path/to/diffusers-folder" in message and "HF_HUB_OFFLINE" in message


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="no such file or folder"):
        load_backbone(str(tmp_path / "nothing-here"))


def test_folder_without_unet_is_reported(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="not a diffusers pipeline folder"):
        load_backbone(str(tmp_path))


def test_single_file_without_config_offline_gives_a_fix(tmp_path):
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(path))
    with pytest.raises(BackboneNotFoundError, match="--model-config DIR"):
        load_backbone(str(path), local_files_only=True)


def test_extractor_on_loaded_folder(tiny_backbone, tiny_images):
    feats = CleanExtractor(tiny_backbone, taps="mid,us10")(tiny_images)
    assert feats["mid"].shape == (2, 64, 2, 2) and feats["us10"].shape == (2, 32, 16, 16)


def test_released_prompt_encoder_keeps_its_prompts_across_moves(tiny_pipeline_dir, tiny_images):
    backbone = load_backbone(str(tiny_pipeline_dir))
    empty, car = backbone.encode_prompts("", 1).hidden_states, backbone.encode_prompts("a car", 1).hidden_states
    latents = backbone.encode_images(tiny_images)
    def nbytes(*modules):  # weights and buffers (CLIP's int64 position ids)
        return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))

    clip_bytes = nbytes(backbone.text_encoder)
    decoder_bytes = nbytes(backbone.vae.decoder, backbone.vae.post_quant_conv)

    assert backbone.release_prompt_encoder(["", "a car"]) == clip_bytes
    assert backbone.release_decoder() == decoder_bytes
    assert backbone.text_encoder is None and backbone.vae.decoder is None
    backbone.clear_prompt_cache()  # kept prompts cannot be recomputed, so they survive
    backbone.to(torch.float64)     # ... and follow the module like buffers do
    assert backbone.encode_prompts(["a car", ""], 2).hidden_states.dtype == torch.float64
    torch.testing.assert_close(backbone.encode_prompts(["a car", ""], 2).hidden_states.float(), torch.cat([car, empty]))
    torch.testing.assert_close(backbone.encode_images(tiny_images.double()).float(), latents, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="'a dog' was not encoded before the prompt encoder was released"):
        backbone.encode_prompts("a dog", 1)
    assert backbone.release_prompt_encoder([""]) == 0  # already released: nothing more to free
