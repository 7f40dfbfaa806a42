"""Diffusers -> original (LDM) layout, checked against diffusers' own LDM loader, fully offline.

Why these tests matter: no real LDM file exists offline, so the only proof that our files are what
real SD single files look like is that diffusers' loader (written for real files) reads them back
bit-identically, for SD1.5-like (conv proj_in/out) and SD2.1-like (linear proj_in/out) models.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cleandift import load_backbone
from cleandift.checkpoints import load_student
from cleandift.errors import BackboneNotFoundError, CheckpointMismatchError, ConfigError
from cleandift.extract import CleanExtractor
from cleandift.ldm_format import (
    UnsupportedConversionError,
    student_to_ldm_unet_file,
    unet_from_ldm,
    unet_to_ldm,
    vae_to_ldm,
    write_single_file,
)


def _student(unet, seed: int = 3):
    """A copy of ``unet`` with every weight changed (so a silent fallback to the base would show)."""
    student = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return student


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, what: str) -> None:
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{what}.{name}")


def _keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


@pytest.fixture(scope="module")
def sd15_single_file(tiny_backbone, tmp_path_factory):
    return write_single_file(tiny_backbone, tmp_path_factory.mktemp("ldm") / "tiny-sd15.safetensors")


def test_sd15_single_file_has_the_ldm_layout(sd15_single_file):
    keys = _keys(sd15_single_file)
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight",         # first downsampler
                "model.diffusion_model.output_blocks.2.1.conv.weight",      # upsampler of a plain up block
                "model.diffusion_model.output_blocks.5.2.conv.weight",      # ... of a cross-attention up block
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # diffusers' SD1 marker key
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",      # LDM counts decoder levels bottom-up
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"):
        assert key in keys, key
    with safe_open(str(sd15_single_file), framework="pt") as handle:
        assert handle.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight").ndim == 4  # 1x1 conv in LDM
        assert handle.get_tensor("model.diffusion_model.middle_block.1.proj_in.weight").ndim == 4  # SD1: conv


def test_sd15_single_file_round_trip_is_identical(sd15_single_file, tiny_pipeline_dir, tiny_backbone, tiny_images):
    loaded = load_backbone(str(sd15_single_file), single_file_config=str(tiny_pipeline_dir), local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(tiny_backbone, part), getattr(loaded, part), part)
    assert loaded.resolution == tiny_backbone.resolution
    # Weights loaded from safetensors sit at file-dependent memory offsets, and CPU kernels round
    # differently for differently aligned operands (~1e-6). Copies have freshly allocated (aligned)
    # storage, so identical weights must then give bit-identical features.
    image = tiny_images[:1]  # one image keeps the test fast; the prompt exercises the loaded text encoder
    want = CleanExtractor(copy.deepcopy(tiny_backbone), taps="mid,us10")(image, prompts="a cat")
    got = CleanExtractor(copy.deepcopy(loaded), taps="mid,us10")(image, prompts="a cat")
    for tap in want:
        torch.testing.assert_close(got[tap], want[tap], rtol=0, atol=0, msg=tap)


@pytest.mark.parametrize("arch", ["tiny_backbone", "tiny_sd21_backbone"])
def test_unet_and_vae_keys_match_diffusers_converters(arch, request):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    backbone = request.getfixturevalue(arch)
    unet, vae = backbone.unet.state_dict(), backbone.vae.state_dict()
    ldm = unet_to_ldm(unet, dict(backbone.unet.config))
    assert ldm.keys() == unet_to_ldm(unet).keys()  # the config only validates; keys alone suffice
    for name, back in (("diffusers", convert_ldm_unet_checkpoint(ldm, dict(backbone.unet.config))),
                       ("ours", unet_from_ldm(ldm))):
        assert back.keys() == unet.keys(), (name, sorted(set(back) ^ set(unet))[:5])
        assert all(back[k] is unet[k] for k in unet), name
    vae_back = convert_ldm_vae_checkpoint(vae_to_ldm(vae, dict(backbone.vae.config)), dict(backbone.vae.config))
    assert vae_back.keys() == vae.keys()
    for name in vae:
        torch.testing.assert_close(vae_back[name], vae[name], rtol=0, atol=0, msg=name)


def test_sd21_unet_and_vae_load_through_from_single_file(tiny_sd21_backbone, tiny_sd21_pipeline_dir, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_file = student_to_ldm_unet_file(tiny_sd21_backbone.unet, tmp_path / "unet.safetensors")
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(tiny_sd21_backbone.vae.state_dict()).items()}, str(vae_file))
    common = {"config": str(tiny_sd21_pipeline_dir), "local_files_only": True}
    unet = UNet2DConditionModel.from_single_file(str(unet_file), subfolder="unet", **common)
    vae = AutoencoderKL.from_single_file(str(vae_file), subfolder="vae", **common)
    _assert_same_weights(tiny_sd21_backbone.unet, unet, "unet")
    _assert_same_weights(tiny_sd21_backbone.vae, vae, "vae")
    with safe_open(str(unet_file), framework="pt") as handle:  # SD2: linear proj_in on both sides
        assert handle.get_tensor("model.diffusion_model.input_blocks.1.1.proj_in.weight").ndim == 2


def test_sd21_text_encoder_is_refused_clearly(tiny_sd21_backbone, tmp_path):
    path = tmp_path / "sd21.safetensors"
    with pytest.raises(NotImplementedError, match="OpenCLIP.*--to ldm-unet"):
        write_single_file(tiny_sd21_backbone, path)
    assert not path.exists()


def test_non_sd_unets_are_refused():
    with pytest.raises(UnsupportedConversionError, match="addition_embed_type"):
        unet_to_ldm({}, {"layers_per_block": 2, "addition_embed_type": "text_time"})
    with pytest.raises(CheckpointMismatchError, match="no LDM equivalent"):
        unet_to_ldm({"down_blocks.0.resnets.0.norm1.weight": torch.zeros(1), "lora.weight": torch.zeros(1)})


def test_ldm_unet_file_loads_as_student(tiny_backbone, tmp_path):
    student = _student(tiny_backbone.unet)
    path = student_to_ldm_unet_file(student, tmp_path / "student_ldm.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in _keys(path))
    loaded, ckpt = load_student(tiny_backbone.unet, path)
    assert ckpt.format == "ldm-unet"
    _assert_same_weights(student, loaded, "student")


def test_misplaced_ldm_files_name_the_right_flag(tiny_backbone, tiny_pipeline_dir, sd15_single_file, tmp_path):
    with pytest.raises(CheckpointMismatchError, match="pass it as --model"):
        load_student(tiny_backbone.unet, sd15_single_file)
    unet_only = student_to_ldm_unet_file(tiny_backbone.unet, tmp_path / "unet_only.safetensors")
    with pytest.raises(BackboneNotFoundError, match="pass it as --checkpoint"):
        load_backbone(str(unet_only), single_file_config=str(tiny_pipeline_dir), local_files_only=True)


def _cli(*argv: str) -> int:
    from cleandift.cli import convert

    parser = argparse.ArgumentParser(prog="cleandift")
    convert.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


def test_cli_convert(tiny_backbone, tiny_pipeline_dir, tmp_path, capsys):
    student = _student(tiny_backbone.unet, seed=5)
    released = tmp_path / "cleandift_tiny_unet.safetensors"  # the released *_unet format + learned timestep
    save_file({**{k: v.contiguous() for k, v in student.state_dict().items()}, "timestep": torch.tensor([100.0])},
              str(released))

    assert _cli(str(released), "--to", "ldm-unet", "--out", str(tmp_path / "odise.safetensors")) == 0
    loaded, _ = load_student(tiny_backbone.unet, tmp_path / "odise.safetensors")
    _assert_same_weights(student, loaded, "ldm-unet")

    single = tmp_path / "single.safetensors"
    assert _cli(str(released), "--to", "single-file", "--out", str(single), "--model", str(tiny_pipeline_dir)) == 0
    assert "wrote" in capsys.readouterr().out
    keys = _keys(single)  # a whole backbone (loading such files is covered above) with the student as U-Net
    assert any(k.startswith("first_stage_model.") for k in keys) and any(k.startswith("cond_stage_model.") for k in keys)
    loaded = copy.deepcopy(tiny_backbone.unet)
    with safe_open(str(single), framework="pt") as handle:
        unet = unet_from_ldm({k: handle.get_tensor(k) for k in keys if k.startswith("model.diffusion_model.")})
    loaded.load_state_dict(unet, strict=True)
    _assert_same_weights(student, loaded, "single-file unet")

    with pytest.raises(ConfigError, match="needs --model"):
        _cli(str(released), "--to", "single-file", "--out", str(tmp_path / "x.safetensors"))
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        _cli(str(released), "--to", "ldm-unet", "--out", str(tmp_path / "x.ckpt"))
