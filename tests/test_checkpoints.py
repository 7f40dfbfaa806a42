"""Released CleanDIFT checkpoints (both formats) load; mismatches are refused with a useful message."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from cleandift.checkpoints import load_student, read_checkpoint, split_checkpoint
from cleandift.errors import CheckpointMismatchError
from cleandift.extract import CleanExtractor


def _perturbed_student(unet):
    student = copy.deepcopy(unet)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student


def _fake_heads(taps=("mid", "us6")):
    heads = {"time_emb.weight": torch.randn(128, 1), "time_in_proj.weight": torch.randn(256, 256),
             "mapping.in_norm.scale": torch.ones(256)}
    for tap in taps:
        heads[f"adapters.{tap}.layers.0.norm.linear.weight"] = torch.zeros(64, 256)
    return heads


def test_unet_format_loads_and_changes_features(tiny_backbone, tiny_images, tmp_path):
    student = _perturbed_student(tiny_backbone.unet)
    path = tmp_path / "cleandift_sd15_unet.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in student.state_dict().items()}, str(path))  # released: bf16
    loaded, ckpt = load_student(tiny_backbone.unet, path)
    assert ckpt.format == "unet" and ckpt.timestep is None
    assert next(loaded.parameters()).dtype == torch.float32  # cast to the backbone's dtype
    ref = student.state_dict()["conv_in.weight"].to(torch.bfloat16).float()
    torch.testing.assert_close(loaded.state_dict()["conv_in.weight"], ref)
    base = CleanExtractor(tiny_backbone, taps="us6")(tiny_images)["us6"]
    tuned = CleanExtractor(tiny_backbone, unet=loaded, taps="us6")(tiny_images)["us6"]
    assert not torch.allclose(base, tuned)
    assert loaded is not tiny_backbone.unet


def test_full_format_splits_into_parts(tiny_backbone, tmp_path):
    student = _perturbed_student(tiny_backbone.unet)
    state = {f"unet_feature_extractor_cleandift.{k}": v for k, v in student.state_dict().items()}
    state.update({f"unet_feature_extractor_base.{k}": v for k, v in tiny_backbone.unet.state_dict().items()})
    state.update(_fake_heads())
    state["timestep"] = torch.tensor(263.5)
    state["ae.encoder.conv_in.weight"] = torch.zeros(1)
    path = tmp_path / "cleandift_sd15_full.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.format == "full"
    assert ckpt.timestep == pytest.approx(263.5)
    assert set(ckpt.heads) == set(_fake_heads())
    assert ckpt.teacher is not None and "conv_in.weight" in ckpt.teacher
    loaded, _ = load_student(tiny_backbone.unet, ckpt)
    torch.testing.assert_close(loaded.state_dict()["conv_in.weight"], student.state_dict()["conv_in.weight"])


def test_mismatched_checkpoint_names_keys_and_fix(tiny_backbone, tiny_sd21_backbone, tmp_path):
    path = tmp_path / "sd21_student.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd21_backbone.unet.state_dict().items()}, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        load_student(tiny_backbone.unet, path)
    message = str(info.value)
    assert "sd21_student.safetensors" in message
    assert "shape mismatch" in message
    assert "cross-attention width is 48 but the backbone's is 32" in message


def test_missing_and_unexpected_keys_are_listed(tiny_backbone, tmp_path):
    state = dict(tiny_backbone.unet.state_dict())
    state.pop("conv_in.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\), e\.g\. conv_in\.weight") as info:
        load_student(tiny_backbone.unet, path)
    assert "1 unexpected key(s), e.g. extra.weight" in str(info.value)


def test_ldm_layout_is_recognised():
    # A U-Net-only LDM file is a student (converted back to diffusers keys) ...
    ckpt = split_checkpoint({"model.diffusion_model.out.2.weight": torch.zeros(1)}, "x.ckpt")
    assert ckpt.format == "ldm-unet" and list(ckpt.student) == ["conv_out.weight"]
    # ... a whole LDM backbone (U-Net + VAE / text encoder) is refused with the fix.
    with pytest.raises(CheckpointMismatchError, match="original \\(LDM\\).*pass it as --model"):
        split_checkpoint({"model.diffusion_model.out.2.weight": torch.zeros(1),
                          "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, "x.ckpt")


def test_pickle_files_are_loaded_weights_only(tiny_backbone, tmp_path):
    good = tmp_path / "student.pt"
    torch.save(tiny_backbone.unet.state_dict(), good)
    loaded, _ = load_student(tiny_backbone.unet, good)
    assert loaded is not None

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(CheckpointMismatchError, match="weights_only"):
        read_checkpoint(bad)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointMismatchError, match="bad.safetensors: not a readable safetensors file"):
        read_checkpoint(path)


def test_export_folder_layout(tiny_backbone, tmp_path):
    import json

    student = _perturbed_student(tiny_backbone.unet)
    student.save_pretrained(str(tmp_path / "export" / "unet"))
    save_file({**_fake_heads(), "timestep": torch.tensor(250.0)}, str(tmp_path / "export" / "heads.safetensors"))
    (tmp_path / "export" / "cleandift.json").write_text(json.dumps({"timestep": 255.0}))
    loaded, ckpt = load_student(tiny_backbone.unet, tmp_path / "export")
    assert ckpt.format == "export" and ckpt.timestep == 255.0 and "timestep" not in ckpt.heads
    torch.testing.assert_close(loaded.state_dict()["conv_in.weight"], student.state_dict()["conv_in.weight"])
