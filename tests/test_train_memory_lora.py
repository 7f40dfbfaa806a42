"""The training memory estimate for both student kinds (``--student full|lora``), on U-Nets and transformers.

Numbers are hand-checkable: a LoRA adapter on a Linear ``in -> out`` has ``r * (in + out)`` parameters, so the
adapter count is summed here directly over the denoiser's Linears that the family preset targets, and the
trainable count is that plus the heads plus the learned timestep. The backbones with an injected adapter are
always freshly loaded (never the session-shared ``tiny_backbone``).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from cleandift import load_backbone
from cleandift.heads import HeadConfig, ProjectionHeads
from cleandift.lora import TARGET_PRESETS, LoraSettings
from cleandift.train.memory import GiB, estimate_memory, lora_count, meta_conditioning
from image_folders import write_random_images

RANK = 4


def _hand_lora_params(denoiser: nn.Module, rank: int) -> tuple[int, int]:
    """(adapter parameters, adapted layers): r * (in + out) over the preset-matched Linears."""
    pattern = TARGET_PRESETS[type(denoiser).__name__]
    linears = [m for name, m in denoiser.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, name)]
    return sum(rank * (m.in_features + m.out_features) for m in linears), len(linears)


def _head_params(taps) -> int:
    return sum(p.numel() for p in ProjectionHeads({t.name: t.channels for t in taps}, HeadConfig()).parameters())


@pytest.fixture
def fresh_sd(tiny_pipeline_dir):
    return load_backbone(str(tiny_pipeline_dir), device="cpu")


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from cleandift.testing import tiny_flux

    return tiny_flux.save(tmp_path_factory.mktemp("flux"))


def test_lora_counts_are_the_hand_sum_and_match_training(fresh_sd):
    from cleandift.distill import FeatureAligner

    taps = fresh_sd.taps.select("all")  # the last tap is the last adapted block: every adapter gets a gradient
    hand, layers = _hand_lora_params(fresh_sd.denoiser, RANK)
    heads = _head_params(taps)
    est = estimate_memory(fresh_sd, taps, 128, 2, 3, HeadConfig(), student_kind="lora", lora=LoraSettings(rank=RANK))
    assert est.student_kind == "lora" and est.lora.rank == RANK and est.lora.alpha == RANK
    assert (est.lora.params, est.lora.layers) == (hand, layers) and layers > 0
    assert est.head_params == heads
    assert est.trainable_params == hand + heads + 1  # + the learned student timestep
    assert est.teacher_params == sum(p.numel() for p in fresh_sd.denoiser.parameters())

    parts = est.components()  # exact parameter arithmetic, fp32 adam
    assert parts["base weights (teacher = student)"] == pytest.approx(est.teacher_params * 4 / GiB)
    assert parts["LoRA adapters (fp32)"] == pytest.approx(hand * 4 / GiB)
    assert parts["gradients (fp32)"] == pytest.approx(est.trainable_params * 4 / GiB)
    assert parts["optimizer state (adam)"] == pytest.approx(est.trainable_params * 8 / GiB)
    assert "teacher weights" not in parts and "student weights (fp32)" not in parts  # one copy of the base
    assert est.components(teacher_dtype="bf16")["base weights (teacher = student)"] == pytest.approx(
        est.teacher_params * 2 / GiB)
    assert lora_count(fresh_sd, LoraSettings(rank=RANK))[0].params == hand

    # what training really builds: the same trainable parameters, and an estimate of the built aligner
    # (the adapter is detected in the denoiser) gives the same numbers
    aligner = FeatureAligner(fresh_sd, taps="all", student_kind="lora", lora=LoraSettings(rank=RANK))
    assert sum(p.numel() for p in aligner.trainable_parameters()) == est.trainable_params
    again = estimate_memory(fresh_sd, taps, 128, 2, 3, HeadConfig())
    assert again.student_kind == "lora" and again.trainable_params == est.trainable_params
    assert again.teacher_params == est.teacher_params  # adapters are not counted as base weights
    assert again.total() == pytest.approx(est.total())


def test_lora_estimate_is_below_full(tiny_backbone):
    taps = tiny_backbone.taps.select(None)
    kwargs = dict(lora=LoraSettings(rank=RANK), compare=True)
    lora = estimate_memory(tiny_backbone, taps, 128, 4, 3, HeadConfig(), student_kind="lora", **kwargs)
    full = lora.alternative
    assert full.student_kind == "full" and full.alternative is None
    assert full.trainable_params > lora.trainable_params
    for config in (dict(), dict(precision="bf16", teacher_dtype="bf16"), dict(checkpointing=True)):
        assert lora.total(**config) < full.total(**config)
        mine, other = lora.summary(**config), full.summary(**config)
        assert mine["base weights"] == pytest.approx(other["base weights"])  # the teacher: one base either way
        assert mine["student weights"] < other["student weights"]
        assert mine["gradients"] < other["gradients"] and mine["optimizer"] < other["optimizer"]
        assert mine["total"] == pytest.approx(sum(v for k, v in mine.items() if k != "total"))
    assert lora.profile.lora > 0 and full.profile.lora == 0  # the adapters' own saved inputs / intermediates
    assert not any(".lora_" in n for n, _ in tiny_backbone.denoiser.named_parameters())  # never touched


def test_transformer_family_estimate(tiny_flux_dir):
    backbone = load_backbone(str(tiny_flux_dir), device="cpu")
    taps = backbone.taps.select(None)
    hand, layers = _hand_lora_params(backbone.denoiser, RANK)
    est = estimate_memory(backbone, taps, 64, 2, 3, HeadConfig(), student_kind="lora", lora=LoraSettings(rank=RANK),
                          compare=True)
    assert (est.lora.params, est.lora.layers) == (hand, layers) and layers > 0
    assert "single blocks" in est.lora.words  # the Flux preset, in words
    assert est.profile.student > 0 and est.profile.teacher_peak > 0 and est.profile.heads > 0
    # the default tap (block2, the first single block) stops before the last single block's adapters
    assert est.trainable_params < hand + _head_params(taps) + 1
    assert est.total() < est.alternative.total()
    report = est.report(teacher_dtype="bf16")
    assert "--student lora" in report and f"rank {RANK}" in report and "compare (same settings)" in report


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "pixart", "flux"])
def test_meta_conditioning_matches_the_encoder(family, tiny_pipeline_dir, tmp_path):
    """Shapes read off the config (no encoder runs) are what the family's prompt encoder returns."""
    if family == "sd15":
        folder = tiny_pipeline_dir
    else:
        import importlib

        folder = importlib.import_module(f"cleandift.testing.tiny_{family}").save(tmp_path)
    backbone = load_backbone(str(folder), device="cpu")
    meta = meta_conditioning(backbone, batch_size=2)  # before any prompt is cached: from the config
    real = backbone.encode_prompts(["", "a photo"], 2)
    assert set(meta) == set(real)
    for key in real:
        assert meta[key].shape == real[key].shape and meta[key].device.type == "meta"
        assert meta[key].is_floating_point() == real[key].is_floating_point()


# ---------------------------------------------------------------------------------------------- CLI
def _images(folder, n=3):
    return write_random_images(folder, n, width=80)


def _lora_file(pipeline_dir, folder, rank):
    """A LoRA student file as a LoRA export's lora/ folder holds it."""
    from cleandift.distill import FeatureAligner
    from cleandift.lora import adapter_metadata, lora_state_dict, pipeline_prefix, save_lora_file

    backbone = load_backbone(str(pipeline_dir), device="cpu")
    FeatureAligner(backbone, taps="mid,us6", student_kind="lora", lora=LoraSettings(rank=rank))
    denoiser = backbone.denoiser
    return save_lora_file(folder, lora_state_dict(denoiser), adapter_metadata(denoiser), pipeline_prefix(denoiser))


def test_cli_dry_run_lora(tiny_pipeline_dir, tmp_path, capsys):
    from cleandift.cli.main import main

    data = _images(tmp_path / "data")
    args = ["train", "--model", str(tiny_pipeline_dir), "--data", str(data), "--out", str(tmp_path / "run"),
            "--size", "64", "--taps", "mid,us6", "--device", "cpu", "--val-images", "0", "--dry-run"]
    assert main(args + ["--student", "lora", "--lora-rank", str(RANK)]) == 0
    report = capsys.readouterr().out
    assert "--student lora" in report and f"student: lora, rank {RANK}, alpha {RANK}" in report
    assert "adapted layers (self-attention (attn1)" in report and "trainable" in report
    for row in ("base weights (teacher = student)", "LoRA adapters (fp32)", "gradients (fp32)",
                "optimizer state (adam)", "student activations", "total"):
        assert row in report
    assert "--student full" in report and "compare (same settings)" in report  # the other kind side by side
    assert "VAE encoder (text encoders released)" in report  # as train() keeps them: one prompt, cached
    assert not (tmp_path / "run").exists()

    assert main(args + ["--student", "lora", "--lora-rank", str(RANK), "--cache-latents"]) == 0
    report = capsys.readouterr().out
    # 3 images x (mean + std) x 4 x 8 x 8 latents x 4 bytes = 6,144 bytes; the encoder is freed too
    assert "latent cache (--cache-latents): 3 image(s), 6.0 KiB" in report
    assert "no VAE (cached latents) (text encoders released)" in report

    lora_dir = tmp_path / "student" / "lora"
    _lora_file(tiny_pipeline_dir, lora_dir, RANK)
    assert main(args + ["--student", "lora", "--lora-rank", str(RANK), "--checkpoint", str(lora_dir)]) == 0
    assert f"(LoRA rank {RANK}," in capsys.readouterr().out

    assert main(args + ["--student", "lora", "--lora-rank", "8", "--checkpoint", str(lora_dir)]) == 2
    err = capsys.readouterr().err
    assert f"LoRA rank {RANK}, but --lora-rank is 8; pass --lora-rank {RANK}" in err

    assert main(args + ["--checkpoint", str(lora_dir)]) == 2  # a LoRA file for a full run
    assert "--student lora --lora-rank" in capsys.readouterr().err

    export = tmp_path / "student"  # a merged student next to lora/: a full checkpoint for a LoRA run
    load_backbone(str(tiny_pipeline_dir), device="cpu").denoiser.save_pretrained(str(export / "unet"))
    assert main(args + ["--student", "lora", "--lora-rank", str(RANK), "--checkpoint", str(export)]) == 2
    err = capsys.readouterr().err
    assert "holds a full student" in err and f"--checkpoint {lora_dir}" in err
    assert main(args + ["--checkpoint", str(export)]) == 0  # and it fits a full run
    capsys.readouterr()
