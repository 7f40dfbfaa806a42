"""LoRA students through ``cleandift train``: config defaults, exact resume, export, extraction from both exports."""

from __future__ import annotations

import pytest
import torch

from cleandift.train.config import LORA_LR, TrainConfig, resolve_config
from image_folders import write_random_images


def _write_images(folder, n: int = 5):
    return write_random_images(folder, n)


def test_lora_learning_rate_default_and_settings():
    assert resolve_config(overrides={"student": "lora"}).lr == LORA_LR
    assert resolve_config(overrides={"student": "lora", "lr": 3e-5}).lr == 3e-5  # an explicit lr wins
    assert resolve_config(overrides={"student": "full"}).lr == 2e-6  # the paper preset, unchanged
    assert resolve_config(overrides={"student": "lora"}, base={"student": "lora", "lr": 5e-4}).lr == 5e-4  # resume
    config = resolve_config(overrides={"student": "lora", "lora_rank": 8, "lora_alpha": 16})
    assert config.lora_settings().scale == 2.0
    from cleandift.errors import ConfigError

    with pytest.raises(ConfigError, match="student="):
        TrainConfig(student="qlora")
    with pytest.raises(ConfigError, match="lora_dropout"):
        TrainConfig(student="lora", lora_dropout=1.5)


class _Interrupt(Exception):
    pass


def test_lora_run_resumes_bit_identical(tiny_pipeline_dir, tmp_path):
    """Each train() call loads its own backbone (the adapter is injected into the denoiser in place)."""
    from safetensors.torch import load_file

    from cleandift.train import train

    data = _write_images(tmp_path / "data")
    kw = dict(model=str(tiny_pipeline_dir), data=str(data), size=64, batch_size=1, grad_accum=2, max_steps=4,
              workers=0, taps="mid,us6", warmup_steps=1, val_every=0, checkpoint_every=2, val_images=0,
              export=False, seed=1, student="lora", lora_rank=4, device="cpu")
    straight = train(TrainConfig(out=str(tmp_path / "a"), **kw), progress=False)

    def crash(step, logs):
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(TrainConfig(out=str(tmp_path / "b"), **kw), callbacks=[crash], progress=False)
    resumed = train(TrainConfig(out=str(tmp_path / "b"), **kw), resume=True, progress=False)
    assert straight.step == resumed.step == 4
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    lora_keys = [k for k in a if k.startswith("unet_feature_extractor_lora.")]
    assert lora_keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in lora_keys)
    assert not any(k.startswith("unet_feature_extractor_cleandift.") for k in a)  # no base weights stored
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)


def test_cli_lora_train_then_extract_both_exports(tiny_pipeline_dir, tmp_path, capsys):
    from cleandift.cli.main import main
    from cleandift.feature_files import load_features

    data = _write_images(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_pipeline_dir), "--data", str(data), "--out", str(out), "--size", "64",
            "--max-steps", "2", "--batch-size", "2", "--workers", "0", "--taps", "us6", "--device", "cpu",
            "--val-every", "0", "--val-images", "0", "--student", "lora", "--lora-rank", "4"]
    assert main(args) == 0
    assert "student exported" in capsys.readouterr().out
    export = out / "export"
    assert (export / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "lr: 0.0001" in (out / "config.yaml").read_text() and "student: lora" in (out / "config.yaml").read_text()

    feats = {}
    for name, ckpt in (("merged", export), ("lora", export / "lora")):
        target = tmp_path / f"feats-{name}"
        code = main(["extract", str(data / "img0.png"), "--model", str(tiny_pipeline_dir), "--checkpoint", str(ckpt),
                     "--out", str(target), "--taps", "us6", "--size", "64"])
        assert code == 0, capsys.readouterr().err
        feats[name], meta = load_features(target)
        assert meta["settings"]["checkpoint"] == str(ckpt)
    a, b = feats["merged"], feats["lora"]
    key = next(iter(a))
    assert torch.allclose(a[key]["us6"].float(), b[key]["us6"].float(), atol=2e-3)  # fp16 feature files


def test_lora_refuses_sharding_backends_before_loading():
    from cleandift.errors import ConfigError
    from cleandift.train.loop import check_distributed

    lora, full = TrainConfig(student="lora"), TrainConfig(student="full")
    for kind in ("DistributedType.FSDP", "DistributedType.DEEPSPEED"):
        with pytest.raises(ConfigError, match="runs under DDP"):
            check_distributed(lora, kind)
        check_distributed(full, kind)  # a full student is a submodule: sharding applies
    for kind in ("DistributedType.NO", "DistributedType.MULTI_GPU", "DistributedType.MULTI_CPU"):
        check_distributed(lora, kind)
