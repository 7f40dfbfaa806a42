"""LoRA students on every family: only adapters / heads / timestep train, the teacher is the untouched base,
exports (merged, unmerged, diffusers' own ``load_lora_weights``) give the same features, wrong files are refused.

Every test loads its own backbone: injecting an adapter changes the denoiser in place, so the session-shared
fixtures must never see one.
"""

from __future__ import annotations

import pytest
import torch

from cleandift import CleanExtractor, load_backbone
from cleandift.checkpoints import load_student, read_checkpoint
from cleandift.distill import FeatureAligner
from cleandift.errors import CheckpointMismatchError, ConfigError
from cleandift.lora import (
    LORA_FILE,
    LoraSettings,
    adapters_disabled,
    has_lora,
    lora_layers,
    lora_parameters,
    merged_state_dict,
    read_lora_file,
)
from cleandift.testing import tiny_flux, tiny_pixart, tiny_sd3, tiny_sdxl
from cleandift.train.export import export_run

RANK = 4


def _save_sd15(folder):
    from cleandift.backbones.random_init import build_random_backbone, save_pipeline_folder

    backbone = build_random_backbone("tiny-sd15", seed=0, tokenizer_dir=folder / "_tok")
    return save_pipeline_folder(backbone, folder / "pipeline")


#: family -> (builder of a pipeline folder, image side, taps to align, diffusers pipeline class or None)
FAMILIES = {
    "sd15": (_save_sd15, 64, "mid,us6", "StableDiffusionPipeline"),
    "sdxl": (tiny_sdxl.save, 64, "us2,us6", "StableDiffusionXLPipeline"),
    "sd3": (tiny_sd3.save, 32, None, "StableDiffusion3Pipeline"),
    "pixart": (tiny_pixart.save, 32, None, None),  # PixArt pipelines have no LoRA loader in diffusers
    "flux": (tiny_flux.save, 32, None, "FluxPipeline"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    build, size, taps, pipeline = FAMILIES[request.param]
    folder = build(tmp_path_factory.mktemp(request.param))
    return request.param, str(folder), size, taps, pipeline


def _images(size, n=2, seed=3):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _train(aligner, images, steps, lr=2e-3):
    opt = torch.optim.Adam(aligner.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = aligner(images, None, torch.Generator().manual_seed(0))  # same draws: the loss must fall
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def _base_state(denoiser):
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in denoiser.state_dict().items()
            if ".lora_" not in k}


def test_lora_student_end_to_end(family, tmp_path):
    """Per family: trains (loss falls), only adapters / heads / timestep change, the teacher equals the
    untouched base exactly, and every export loads back to the same features."""
    name, folder, size, taps, pipeline = family
    backbone = load_backbone(folder)
    untouched = load_backbone(folder)
    base_before = _base_state(backbone.denoiser)
    aligner = FeatureAligner(backbone, taps=taps, student_kind="lora", lora=LoraSettings(rank=RANK))
    taps = aligner.tap_names
    trainable_before = {k: v.detach().clone() for k, v in aligner.named_parameters() if v.requires_grad}
    images = _images(size)

    losses = _train(aligner, images, steps=4)
    assert losses[-1] < losses[0], losses

    # base weights bit-identical; the adapters (B starts at zero) and the heads moved
    assert all(torch.equal(base_before[k], v) for k, v in _base_state(backbone.denoiser).items())
    adapters = lora_parameters(backbone.denoiser)
    assert adapters and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapters.items())
    trainable = dict(aligner.named_parameters())
    assert {id(p) for p in aligner.trainable_parameters()} == {id(p) for p in trainable.values() if p.requires_grad}
    assert not any(p.requires_grad for k, p in backbone.denoiser.named_parameters() if ".lora_" not in k)
    assert all(p.dtype == torch.float32 for p in adapters.values())
    assert any(not torch.equal(trainable_before[k], trainable[k]) for k in trainable_before if "adapters." in k)

    # the teacher (adapters off) is the untouched base model, exactly; the student (adapters on) is not
    x0 = untouched.encode_images(images)
    cond = untouched.encode_prompts(None, 2)
    t = torch.tensor([500.0, 120.0])
    selected = aligner.selected_taps
    with aligner.teacher_mode():
        teacher = backbone.run_taps(x0, t, cond, selected, denoiser=aligner.teacher)
    base = untouched.run_taps(x0, t, cond, selected, denoiser=untouched.denoiser)
    student = backbone.run_taps(x0, t, cond, selected, denoiser=aligner.student)
    for tap in taps:
        assert torch.equal(teacher[tap], base[tap]), tap
    assert any(not torch.equal(student[tap], base[tap]) for tap in taps)

    # export: merged unet/ and unmerged lora/ (file or folder) give the student's features
    reference = aligner.extract(images, taps=taps)
    export = export_run(aligner, tmp_path / "export")
    assert (export / "lora" / LORA_FILE).is_file() and (export / "unet" / "config.json").is_file()
    assert not (export / "cleandift_unet.safetensors").exists()
    lora = read_lora_file(export / "lora" / LORA_FILE)
    assert lora.rank == RANK and lora.alpha == RANK and lora.prefix == ("unet" if name in ("sd15", "sdxl")
                                                                          else "transformer")
    for spec, tol in ((export, 1e-4), (export / "lora", 0.0), (export / "lora" / LORA_FILE, 0.0)):
        ckpt = read_checkpoint(spec)
        model, ckpt = load_student(untouched.denoiser, ckpt)
        assert ckpt.timestep == pytest.approx(float(aligner.timestep.detach()))
        feats = CleanExtractor(untouched, unet=model, taps=taps)(images)
        for tap in taps:
            err = (feats[tap] - reference[tap]).abs().max().item()
            assert err <= tol * max(1.0, reference[tap].abs().max().item()), (spec, tap, err)
    assert not has_lora(untouched.denoiser)  # load_student adapted a copy

    # diffusers' own loader reads the same file and gives the same features
    if pipeline is not None:
        import diffusers

        pipe = getattr(diffusers, pipeline).from_pretrained(folder, local_files_only=True)
        pipe.load_lora_weights(str(export / "lora"))
        denoiser = pipe.unet if hasattr(pipe, "unet") and pipe.unet is not None else pipe.transformer
        feats = CleanExtractor(untouched, unet=denoiser, timestep=float(aligner.timestep.detach()), taps=taps)(images)
        for tap in taps:
            assert torch.allclose(feats[tap], reference[tap], atol=1e-5, rtol=1e-5), tap


def test_adapters_disabled_context_restores_state(tiny_pipeline_dir):
    backbone = load_backbone(str(tiny_pipeline_dir))
    FeatureAligner(backbone, taps="us6", student_kind="lora", lora=LoraSettings(rank=2))
    layers = list(lora_layers(backbone.denoiser).values())
    assert layers and not any(m.disable_adapters for m in layers)
    with adapters_disabled(backbone.denoiser):
        assert all(m.disable_adapters for m in layers)
        with pytest.raises(RuntimeError):
            with adapters_disabled(backbone.denoiser):
                raise RuntimeError("boom")
        assert all(m.disable_adapters for m in layers)  # the inner exit restored "disabled"
    assert not any(m.disable_adapters for m in layers)


def test_target_presets_adapt_self_attention_and_ffn_only(tiny_pipeline_dir):
    backbone = load_backbone(str(tiny_pipeline_dir))
    FeatureAligner(backbone, taps="us6", student_kind="lora", lora=LoraSettings(rank=2))
    names = sorted(lora_layers(backbone.denoiser))
    assert names and all(".attn1." in n or ".ff.net." in n for n in names)
    assert not any(".attn2." in n for n in names)  # cross-attention stays frozen (paper: self-attn + FFN)
    suffixes = {n.split("transformer_blocks.0.")[-1] for n in names}
    assert suffixes == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"}
    # the hand count of adapter parameters: r * (in + out) per adapted Linear
    expected = sum(2 * (m.in_features + m.out_features) for m in
                   (backbone.denoiser.get_submodule(n).base_layer for n in names))
    assert sum(p.numel() for p in lora_parameters(backbone.denoiser).values()) == expected


def test_custom_targets_and_bad_targets(tiny_pipeline_dir):
    backbone = load_backbone(str(tiny_pipeline_dir))
    FeatureAligner(backbone, taps="us6", student_kind="lora", lora=LoraSettings(rank=2, targets="to_q,to_v"))
    names = lora_layers(backbone.denoiser)
    assert names and all(n.endswith(("to_q", "to_v")) for n in names)
    with pytest.raises(ConfigError, match="match no layer"):
        FeatureAligner(load_backbone(str(tiny_pipeline_dir)), taps="us6", student_kind="lora",
                       lora=LoraSettings(targets="no_such_layer"))
    with pytest.raises(ConfigError, match="already carries"):
        FeatureAligner(backbone, taps="us6", student_kind="lora")
    with pytest.raises(ConfigError, match="lora_rank"):
        LoraSettings(rank=0)
    with pytest.raises(ConfigError, match="student="):
        FeatureAligner(backbone, taps="us6", student_kind="qlora")


def test_merged_state_is_base_plus_scaled_product(tiny_pipeline_dir):
    """Hand formula: W' = W + (alpha / r) * B @ A for every adapted Linear, every other tensor unchanged."""
    backbone = load_backbone(str(tiny_pipeline_dir))
    base = _base_state(backbone.denoiser)
    FeatureAligner(backbone, taps="us6", student_kind="lora", lora=LoraSettings(rank=2, alpha=6.0))
    with torch.no_grad():
        for p in lora_parameters(backbone.denoiser).values():
            p.normal_(0, 0.1)
    merged = merged_state_dict(backbone.denoiser)
    assert merged.keys() == base.keys()
    layers = lora_layers(backbone.denoiser)
    for key, value in merged.items():
        module = key.rsplit(".", 1)[0]
        if module in layers and key.endswith(".weight"):
            layer = layers[module]
            a, b = layer.lora_A["cleandift"].weight, layer.lora_B["cleandift"].weight
            assert torch.allclose(value, base[key] + 3.0 * b @ a, atol=1e-6)
        else:
            assert torch.equal(value, base[key]), key


def test_wrong_rank_family_and_kind_are_refused(tmp_path, tiny_pipeline_dir):
    sd = load_backbone(str(tiny_pipeline_dir))
    aligner = FeatureAligner(sd, taps="us6", student_kind="lora", lora=LoraSettings(rank=RANK))
    export = export_run(aligner, tmp_path / "sd-export")

    other_rank = FeatureAligner(load_backbone(str(tiny_pipeline_dir)), taps="us6", student_kind="lora",
                                lora=LoraSettings(rank=8))
    with pytest.raises(CheckpointMismatchError, match="--lora-rank 4"):
        other_rank.load_checkpoint(str(export / "lora"))
    other_alpha = FeatureAligner(load_backbone(str(tiny_pipeline_dir)), taps="us6", student_kind="lora",
                                 lora=LoraSettings(rank=RANK, alpha=16))
    with pytest.raises(CheckpointMismatchError, match="--lora-alpha 4"):
        other_alpha.load_checkpoint(str(export / "lora"))
    full = FeatureAligner(load_backbone(str(tiny_pipeline_dir)), taps="us6")
    with pytest.raises(CheckpointMismatchError, match="--student lora"):
        full.load_checkpoint(str(export / "lora"))
    with pytest.raises(CheckpointMismatchError, match="full student"):
        other_rank.load_checkpoint(str(export / "unet"))  # a merged folder is a full student
    # the same rank loads (heads and timestep too)
    same = FeatureAligner(load_backbone(str(tiny_pipeline_dir)), taps="us6", student_kind="lora",
                          lora=LoraSettings(rank=RANK))
    same.load_checkpoint(str(export / "lora"))
    assert float(same.timestep.detach()) == pytest.approx(float(aligner.timestep.detach()))

    flux = load_backbone(str(tiny_flux.save(tmp_path / "flux")))
    with pytest.raises(CheckpointMismatchError, match="do not exist in this FluxTransformer2DModel"):
        load_student(flux.denoiser, str(export / "lora"))
    # a training run's denoiser already carries the adapter: applying another one there is refused
    with pytest.raises(CheckpointMismatchError, match="already carries"):
        load_student(sd.denoiser, str(export / "lora"))


def test_flow_heads_see_the_teachers_sigma(tmp_path):
    """Rectified flow: the heads are conditioned on 1000 * sigma(t) (resolution dependent for Flux)."""
    flux = load_backbone(str(tiny_flux.save(tmp_path / "flux")))
    aligner = FeatureAligner(flux, taps=None, student_kind="lora", lora=LoraSettings(rank=2))
    t = torch.tensor([0.0, 250.0, 500.0, 999.0])
    small, large = torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 32, 32)
    head_small = aligner.head_timesteps(t, small)
    expected = 1000 * flux.noise.sigma(t, seq_len=flux.token_count(small))
    assert torch.allclose(head_small, expected)
    assert head_small[0] == 0 and (head_small[1:] > t[1:]).all()  # the shift moves sigma up
    assert not torch.allclose(head_small, aligner.head_timesteps(t, large))  # dynamic shift: more tokens, more noise


def test_vp_heads_see_t_itself(tiny_pipeline_dir):
    sd = load_backbone(str(tiny_pipeline_dir))
    aligner = FeatureAligner(sd, taps="us6")
    t = torch.tensor([1.0, 261.0, 998.0])
    assert torch.equal(aligner.head_timesteps(t, torch.zeros(1, 4, 8, 8)), t)


def test_bf16_base_keeps_fp32_adapters_and_gradient_checkpointing_matches(tiny_pipeline_dir):
    """Memory options: a bf16 base (teacher_dtype) with fp32 adapter master weights; gradient checkpointing
    recomputes the student's activations without changing the loss or the adapter gradients."""
    images = _images(64)
    bf16 = load_backbone(str(tiny_pipeline_dir))
    aligner = FeatureAligner(bf16, taps="us6", student_kind="lora", lora=LoraSettings(rank=2),
                             teacher_dtype=torch.bfloat16)
    assert aligner.teacher_dtype == torch.bfloat16 and aligner.student_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(bf16.denoiser).values())
    out = aligner(images, None, torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = [p.grad for p in lora_parameters(bf16.denoiser).values() if p.grad is not None]  # none past the tap
    assert torch.isfinite(out.loss) and grads and all(g.dtype == torch.float32 for g in grads)

    def loss_and_grads(checkpointing):
        backbone = load_backbone(str(tiny_pipeline_dir))
        torch.manual_seed(0)
        al = FeatureAligner(backbone, taps="mid,us6", student_kind="lora", lora=LoraSettings(rank=2),
                            gradient_checkpointing=checkpointing)
        with torch.no_grad():
            for p in lora_parameters(backbone.denoiser).values():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        loss = al(images, None, torch.Generator().manual_seed(0)).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora_parameters(backbone.denoiser).values()
                               if p.grad is not None]

    plain, checkpointed = loss_and_grads(False), loss_and_grads(True)
    assert torch.allclose(plain[0], checkpointed[0], atol=1e-6)
    assert len(plain[1]) == len(checkpointed[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(plain[1], checkpointed[1]))


def test_load_student_in_place_equals_copy(tiny_pipeline_dir, tmp_path):
    """``inplace=True`` (what ``cleandift extract`` uses) puts the student into the backbone's own denoiser."""
    aligner = FeatureAligner(load_backbone(str(tiny_pipeline_dir)), taps="us6", student_kind="lora",
                             lora=LoraSettings(rank=RANK))
    _train(aligner, _images(64), steps=2)
    export = export_run(aligner, tmp_path / "export")
    images = _images(64, seed=7)
    for spec in (export, export / "lora"):
        copied_from, in_place = load_backbone(str(tiny_pipeline_dir)), load_backbone(str(tiny_pipeline_dir))
        copy_model, _ = load_student(copied_from.denoiser, spec)
        own_model, _ = load_student(in_place.denoiser, spec, inplace=True)
        assert own_model is in_place.denoiser and copy_model is not copied_from.denoiser
        a = CleanExtractor(copied_from, unet=copy_model, taps="us6")(images)["us6"]
        b = CleanExtractor(in_place, unet=own_model, taps="us6")(images)["us6"]
        assert torch.equal(a, b), spec
