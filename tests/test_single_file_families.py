"""Single-file SDXL, SD3 / SD3.5 and Flux.1 checkpoints via ``load_backbone(file, single_file_config=DIR)``.

Tiny real-architecture diffusers models are written in their family's original layout
(:mod:`cleandift.testing.original_formats`, the inverse of diffusers' converters) and loaded back; the
denoiser (and whatever else the file holds) must equal the model that was written, tensor for tensor,
and extract the same features as the diffusers folder the file was written from.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from cleandift import CleanExtractor, load_backbone
from cleandift.backbones.single_file import FLUX, PIXART, SD, SD3, SDXL, detect_family, flux_to_diffusers
from cleandift.errors import BackboneNotFoundError
from cleandift.testing import original_formats, tiny_flux, tiny_pixart, tiny_sd3, tiny_sdxl


def _assert_equal_state(want: torch.nn.Module, got: torch.nn.Module, what: str) -> None:
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert set(want_sd) == set(got_sd), f"{what}: keys differ: {sorted(set(want_sd) ^ set(got_sd))[:5]}"
    for key, value in want_sd.items():
        assert got_sd[key].dtype == value.dtype and torch.equal(got_sd[key], value), f"{what}: {key}"


def _assert_same_features(folder_backbone, file_backbone, size: int) -> None:
    # copies give both models freshly allocated (equally aligned) weights: identical weights then give
    # bit-identical CPU features (see test_ldm_format)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    want = CleanExtractor(copy.deepcopy(folder_backbone))(images, prompts="a cat")
    got = CleanExtractor(copy.deepcopy(file_backbone))(images, prompts="a cat")
    assert want.keys() == got.keys()
    for tap in want:
        torch.testing.assert_close(got[tap], want[tap], rtol=0, atol=0, msg=tap)


def _one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def _load(path, folder):
    return load_backbone(str(path), single_file_config=str(folder), local_files_only=True)


# ------------------------------------------------------------------------------------------------ Flux


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tiny_flux.save(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def flux_folder_backbone(flux_dir):
    return load_backbone(str(flux_dir))


@pytest.fixture(scope="module")
def flux_file(flux_folder_backbone, tmp_path_factory):
    state = original_formats.flux_to_original(flux_folder_backbone.denoiser)
    return original_formats.save(state, tmp_path_factory.mktemp("flux_file") / "flux1-tiny.safetensors")


def test_flux_writer_is_what_diffusers_converter_reads(flux_folder_backbone, flux_file, flux_dir,
                                                       monkeypatch):
    """diffusers' own converter (its single-block split rescaled from FLUX.1's 3072 channels to the tiny
    width, the only width-specific line) reads the written file back to the same tensors."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils

    width = flux_folder_backbone.denoiser.inner_dim

    class TorchAtTinyWidth(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def split(tensor, sizes, dim=0):
            return torch.split(tensor, [s * width // 3072 for s in sizes], dim=dim)

    monkeypatch.setattr(single_file_utils, "torch", TorchAtTinyWidth("torch"))
    model = FluxTransformer2DModel.from_single_file(str(flux_file), config=str(flux_dir),
                                                    subfolder="transformer", local_files_only=True)
    _assert_equal_state(flux_folder_backbone.denoiser, model, "transformer")


def test_flux_single_file_round_trip(flux_folder_backbone, flux_file, flux_dir):
    loaded = _load(flux_file, flux_dir)
    assert type(loaded).__name__ == "FluxBackbone" and loaded.has_guidance
    _assert_equal_state(flux_folder_backbone.denoiser, loaded.denoiser, "transformer")
    _assert_same_features(flux_folder_backbone, loaded, 32)


def test_flux_file_with_the_comfyui_prefix_and_without_guidance(tmp_path):
    """schnell layout (no ``guidance_in``) under ``model.diffusion_model.``."""
    folder = tiny_flux.save(tmp_path / "schnell", seed=5, guidance_embeds=False, use_dynamic_shifting=False)
    from diffusers import FluxTransformer2DModel

    want = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer", local_files_only=True)
    state = original_formats.flux_to_original(want, prefix="model.diffusion_model.")
    assert not any("guidance_in" in k for k in state)
    loaded = _load(original_formats.save(state, tmp_path / "schnell.safetensors"), folder)
    assert not loaded.has_guidance
    _assert_equal_state(want, loaded.denoiser, "transformer")


def test_flux_converter_is_the_writers_inverse(flux_folder_backbone):
    want = flux_folder_backbone.denoiser.state_dict()
    got = flux_to_diffusers(original_formats.flux_to_original(want))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------- SD3


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def sd3_case(request, tmp_path_factory):
    folder = tiny_sd3.save(tmp_path_factory.mktemp(request.param), sd35=request.param == "sd35")
    backbone = load_backbone(str(folder))
    state = original_formats.sd3_to_original(backbone.denoiser)
    path = original_formats.save(state, folder.parent / f"{request.param}_tiny.safetensors")
    return folder, backbone, path


def test_sd3_single_file_round_trip(sd3_case):
    folder, folder_backbone, path = sd3_case
    loaded = _load(path, folder)
    assert type(loaded).__name__ == "StableDiffusion3Backbone"
    _assert_equal_state(folder_backbone.denoiser, loaded.denoiser, "transformer")
    _assert_same_features(folder_backbone, loaded, 32)


def test_sd3_file_keys_look_like_stabilitys(sd3_case):
    from safetensors import safe_open

    with safe_open(str(sd3_case[2]), framework="pt") as handle:
        keys = set(handle.keys())
    assert {"model.diffusion_model.pos_embed", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "model.diffusion_model.final_layer.adaLN_modulation.1.weight"} <= keys
    assert all(k.startswith("model.diffusion_model.") for k in keys)


# ------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return tiny_sdxl.save(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sdxl_folder_backbone(sdxl_dir):
    return load_backbone(str(sdxl_dir))


def test_sdxl_unet_and_vae_file_takes_the_text_encoders_from_the_config(sdxl_folder_backbone, sdxl_dir,
                                                                        tmp_path):
    state = original_formats.sdxl_to_original(sdxl_folder_backbone.pipe, text_encoders=False)
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    loaded = _load(original_formats.save(state, tmp_path / "sdxl_unet_vae.safetensors"), sdxl_dir)
    assert type(loaded).__name__ == "StableDiffusionXLBackbone"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_equal_state(getattr(sdxl_folder_backbone.pipe, part), getattr(loaded.pipe, part), part)
    _assert_same_features(sdxl_folder_backbone, loaded, 64)


def _sdxl_two_widths(folder, seed):
    """The tiny SDXL with CLIP-L narrower than OpenCLIP-G (16 vs 32, as 768 vs 1280 in SDXL): diffusers tells
    the two encoders of a file apart by their width."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from cleandift.testing import components

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**tiny_sdxl.UNET, "cross_attention_dim": 16 + 32})
    return StableDiffusionXLPipeline(
        vae=components.vae(seed=seed + 1, scaling_factor=0.13025), unet=unet,
        text_encoder=components.clip_text_encoder(16, seed=seed + 2),
        text_encoder_2=components.clip_text_encoder(32, projection_dim=32, with_projection=True,
                                                    seed=seed + 3),
        tokenizer=components.clip_tokenizer(folder / "tok1"),
        tokenizer_2=components.clip_tokenizer(folder / "tok2"),
        scheduler=EulerDiscreteScheduler(**tiny_sdxl.SCHEDULER), add_watermarker=False)


def test_full_sdxl_file_loads_every_model_from_the_file(tmp_path):
    """U-Net, VAE, CLIP-L and OpenCLIP-G as ``sd_xl_base_1.0.safetensors`` holds them; the config folder has
    other weights (another seed), so everything equal to the written pipeline came from the file."""
    config = tmp_path / "config"
    _sdxl_two_widths(tmp_path / "_a", seed=7).save_pretrained(str(config))
    written = _sdxl_two_widths(tmp_path / "_b", seed=0)
    state = original_formats.sdxl_to_original(written)
    assert {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection",
            "first_stage_model.decoder.conv_in.weight"} <= set(state)
    loaded = _load(original_formats.save(state, tmp_path / "sdxl_full.safetensors"), config)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_equal_state(getattr(written, part), getattr(loaded.pipe, part), part)


# ------------------------------------------------------------------------------------- errors, detection


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_offline_transformer_file_without_config_names_the_flag(family, flux_file, sd3_case):
    path = flux_file if family == "flux" else sd3_case[2]
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone(str(path), local_files_only=True)
    message = _one_line_error(info)
    assert "--model-config DIR" in message and str(path) in message


def test_offline_sdxl_file_without_config_names_the_flag(sdxl_folder_backbone, tmp_path):
    state = original_formats.sdxl_to_original(sdxl_folder_backbone.pipe, text_encoders=False)
    path = original_formats.save(state, tmp_path / "sdxl.safetensors")
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone(str(path), local_files_only=True)
    message = _one_line_error(info)
    assert "--model-config DIR" in message and "text encoder" in message


def test_config_folder_of_another_family_is_named(flux_file, sdxl_dir):
    with pytest.raises(BackboneNotFoundError) as info:
        _load(flux_file, sdxl_dir)
    message = _one_line_error(info)
    assert "Flux.1 checkpoint" in message and "SDXL folder" in message


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_pixart_file_is_refused_with_what_to_pass(layout, tmp_path):
    if layout == "diffusers":
        state = dict(tiny_pixart.build(tmp_path / "_tok").transformer.state_dict())
    else:  # PixArt-Sigma's own names
        state = {"x_embedder.proj.weight": torch.zeros(2, 4, 2, 2), "t_block.1.weight": torch.zeros(12, 2),
                 "y_embedder.y_proj.fc1.weight": torch.zeros(2, 2),
                 "blocks.0.cross_attn.q_linear.weight": torch.zeros(2, 2)}
    path = original_formats.save(state, tmp_path / "pixart.safetensors")
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone(str(path), single_file_config=str(tmp_path), local_files_only=True)
    message = _one_line_error(info)
    assert "not supported by diffusers single-file loading" in message
    assert "pass a diffusers PixArt folder" in message


def test_truncated_file_is_reported_as_damaged(flux_file, flux_dir, tmp_path):
    data = flux_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BackboneNotFoundError) as info:
        _load(path, flux_dir)
    message = _one_line_error(info)
    assert str(path) in message and "damaged or truncated" in message


def test_detect_family_from_key_names():
    p = "model.diffusion_model."
    assert detect_family(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) == FLUX
    assert detect_family([p + "double_blocks.0.img_mod.lin.weight", p + "single_blocks.0.linear2.b"]) == FLUX
    assert detect_family([p + "joint_blocks.0.x_block.attn.qkv.weight", "first_stage_model.x"]) == SD3
    assert detect_family([p + "label_emb.0.0.weight", p + "input_blocks.0.0.weight"]) == SDXL
    assert detect_family(["conditioner.embedders.1.model.positional_embedding"]) == SDXL
    block = "transformer_blocks.0.attn.to_q.weight"
    assert detect_family(["adaln_single.linear.weight", "pos_embed.proj.weight", block]) == PIXART
    assert detect_family(["context_embedder.weight", "pos_embed.proj.weight", block]) == SD3
    assert detect_family([p + "input_blocks.0.0.weight", "cond_stage_model.transformer.x"]) == SD


def test_online_without_config_takes_the_repo_diffusers_would(tmp_path):
    """The config repo comes from diffusers' ``infer_diffusers_model_type`` on the header's shapes alone."""
    from cleandift.backbones.single_file import _default_config

    path = tmp_path / "x.safetensors"
    flux = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,),
            "single_blocks.0.linear1.weight": (21504, 3072), "img_in.weight": (3072, 64)}
    dev = {**flux, "guidance_in.in_layer.bias": (3072,)}
    assert _default_config(path, FLUX, dev, local_files_only=False) == "black-forest-labs/FLUX.1-dev"
    assert _default_config(path, FLUX, flux, local_files_only=False) == "black-forest-labs/FLUX.1-schnell"
    sd3 = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
           "model.diffusion_model.pos_embed": (1, 36864, 1536)}
    want = "stabilityai/stable-diffusion-3-medium-diffusers"
    assert _default_config(path, SD3, sd3, local_files_only=False) == want
    tiny = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (64,)}
    with pytest.raises(BackboneNotFoundError, match="--model-config DIR"):
        _default_config(path, SD3, tiny, local_files_only=False)
