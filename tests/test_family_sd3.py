"""SD3 / SD3.5: a tiny real-architecture pipeline saved as a diffusers folder, read via ``load_backbone``.

References are computed by diffusers alone (the same folder loaded with ``StableDiffusion3Pipeline``) or by
hand: the pipeline's ``encode_prompt``, the scheduler's ``scale_noise`` / ``sigmas``, and a plain
``SD3Transformer2DModel`` forward with hooks whose image tokens are reshaped here.
"""

from __future__ import annotations

import pytest
import torch

from cleandift import CleanExtractor, NoisyExtractor, load_backbone
from cleandift.backbones import sd3 as sd3_module
from cleandift.backbones.latents import nbytes
from cleandift.backbones.sd3 import StableDiffusion3Backbone
from cleandift.testing import tiny_sd3

SHIFT = 3.0  # tiny_sd3.SCHEDULER, SD3's own


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return tiny_sd3.save(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return load_backbone(str(sd3_dir))


@pytest.fixture(scope="module")
def sd3_pipe(sd3_dir):
    """The same folder loaded by diffusers alone: the reference for every convention."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True)


def _images(h=32, w=32, n=2, seed=3):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _sigma(t: torch.Tensor) -> torch.Tensor:
    """SD3's static shift by hand: sigma = s u / (1 + (s - 1) u), u = t / 1000."""
    u = t.double() / 1000
    return SHIFT * u / (1 + (SHIFT - 1) * u)


def _plain_forward_taps(transformer, inputs: dict, patch: int) -> dict[int, torch.Tensor]:
    """Every joint block's image stream from one full diffusers forward, reshaped to maps by hand."""
    seen: dict[int, tuple] = {}
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
             for k, block in enumerate(transformer.transformer_blocks)]
    try:
        with torch.no_grad():
            transformer(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    b, _, hl, wl = inputs["hidden_states"].shape
    maps = {}
    for k, (text, image) in seen.items():
        if k < len(seen) - 1:
            assert text.shape[1] == inputs["encoder_hidden_states"].shape[1]
        maps[k] = image.reshape(b, hl // patch, wl // patch, image.shape[-1]).permute(0, 3, 1, 2)
    assert seen[len(seen) - 1][0] is None  # the last block's text output: context_pre_only
    return maps


def test_folder_loads_as_sd3_with_its_tap_table(sd3):
    assert isinstance(sd3, StableDiffusion3Backbone)
    assert sd3.family == "sd3" and sd3.latent_factor == 2 and sd3.patch_size == 2
    assert sd3.resolution == 64  # sample_size 32 latent cells x VAE factor 2
    # 4 joint blocks, inner_dim = 4 heads x 8 = 32 channels, one token per 2x2 latent cells
    assert [(t.name, t.module, t.channels, t.stride, t.layout, t.stream) for t in sd3.taps] == [
        (f"block{i}", f"transformer_blocks.{i}", 32, 2, "tokens", 1) for i in range(4)]
    assert sd3.default_feature_taps == ("block2",) and sd3.size_multiple == 4
    assert sd3.max_image_size == 24 * 2 * 2  # pos_embed_max_size patches x patch x VAE factor
    assert sd3.token_grid(torch.zeros(1, 4, 12, 20)) == (6, 10)
    info = sd3.describe()
    assert (info["noise_process"], info["shift"], info["timestep_scale"], info["t5"]) == \
        ("rectified-flow", 3.0, 1000.0, True)


def test_empty_prompt_is_the_pipelines_encoding_of_empty(sd3, sd3_pipe):
    with torch.no_grad():  # as the backbone encodes (T5's attention kernel differs with autograd on)
        embeds, neg, pooled, neg_pooled = sd3_pipe.encode_prompt("", None, None, device="cpu",
                                                                  do_classifier_free_guidance=False,
                                                                  max_sequence_length=256)
    assert neg is None and neg_pooled is None
    for prompts in (None, ""):
        cond = sd3.encode_prompts(prompts, 2)
        assert torch.equal(cond.hidden_states, embeds.expand(2, -1, -1))
        assert torch.equal(cond["pooled_projections"], pooled.expand(2, -1))
    # by hand: 77 CLIP tokens (16 + 32 channels, zero-padded to T5's 64) then T5's 256 tokens
    h = cond.hidden_states[0]
    assert h.shape == (77 + 256, 64) and cond["pooled_projections"].shape == (2, 16 + 32)
    ids = sd3_pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        clip_l = sd3_pipe.text_encoder(ids, output_hidden_states=True)
        t5_ids = sd3_pipe.tokenizer_3("", padding="max_length", max_length=256, return_tensors="pt").input_ids
        t5 = sd3_pipe.text_encoder_3(t5_ids)[0]
    torch.testing.assert_close(h[:77, :16], clip_l.hidden_states[-2][0], rtol=0, atol=1e-6)  # penultimate
    assert not torch.allclose(h[:77, :16], clip_l.hidden_states[-1][0])
    assert torch.equal(h[:77, 48:], torch.zeros(77, 16))
    torch.testing.assert_close(h[77:], t5[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["pooled_projections"][0, :16], clip_l.text_embeds[0], rtol=0, atol=1e-6)


def test_without_t5_its_tokens_are_zeros_as_in_the_pipeline(tmp_path, sd3, sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    no_t5 = load_backbone(str(tiny_sd3.save(tmp_path, t5=False)))  # a folder saved without T5
    skipped = sd3_module.load(str(sd3_dir), local_files_only=True, text_encoder_3=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a cat", None, None, device="cpu",
                                                  do_classifier_free_guidance=False)
    with_t5 = sd3.encode_prompts("a cat", 1)
    for backbone in (no_t5, skipped):
        assert not backbone.has_t5 and backbone.describe()["t5"] is False
        cond = backbone.encode_prompts("a cat", 1)
        assert torch.equal(cond.hidden_states, embeds) and torch.equal(cond["pooled_projections"], pooled)
        assert torch.equal(cond.hidden_states[:, 77:], torch.zeros(1, 256, 64))
        # same CLIP weights (same seeds): the CLIP part is unchanged by dropping T5
        torch.testing.assert_close(cond.hidden_states[:, :77], with_t5.hidden_states[:, :77], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_taps_equal_block_outputs_of_a_plain_forward(variant, sd3, sd3_pipe, tmp_path):
    if variant == "sd35":  # dual-attention blocks with RMS q/k norm (SD3.5's MMDiT-X)
        folder = tiny_sd3.save(tmp_path, sd35=True)
        backbone = load_backbone(str(folder))
        assert backbone.denoiser.transformer_blocks[0].use_dual_attention
        transformer = type(sd3_pipe.transformer).from_pretrained(str(folder), subfolder="transformer")
    else:
        backbone, transformer = sd3, sd3_pipe.transformer
    x = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(0))  # not square: 6x10 tokens
    t = torch.tensor([10.0, 700.0])
    cond = backbone.encode_prompts(["a dog", ""], 2)
    ours = backbone.run_taps(x, t, cond, backbone.taps.select("all"))
    # reference: the pipeline's transformer call, timestep = shifted sigma x 1000 computed by hand
    ref = _plain_forward_taps(transformer, dict(hidden_states=x, timestep=(_sigma(t) * 1000).float(),
                                                encoder_hidden_states=cond.hidden_states,
                                                pooled_projections=cond["pooled_projections"]), patch=2)
    assert list(ours) == [f"block{k}" for k in range(4)]
    for k, feat in enumerate(ours.values()):
        assert feat.shape == (2, 32, 6, 10)
        torch.testing.assert_close(feat, ref[k], rtol=0, atol=1e-5)


def test_early_stop_equals_the_full_forward_and_runs_nothing_after_the_last_tap(sd3):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    cond = sd3.encode_prompts("a cat", 1)
    full = sd3.run_taps(x, 261.0, cond, sd3.taps.select("block1"), stop_early=False)
    calls = []
    later = (sd3.denoiser.transformer_blocks[2], sd3.denoiser.transformer_blocks[3], sd3.denoiser.norm_out,
             sd3.denoiser.proj_out)
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in later]
    try:
        early = sd3.run_taps(x, 261.0, cond, sd3.taps.select("block1"))
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    assert torch.equal(early["block1"], full["block1"])


@pytest.fixture(scope="module")
def sd3_scheduler(sd3_dir):
    """The folder's scheduler, loaded by diffusers alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3_dir), subfolder="scheduler")


def test_add_noise_is_the_schedulers_scale_noise(sd3, sd3_scheduler):
    """``x_t`` equals ``FlowMatchEulerDiscreteScheduler.scale_noise`` at the same shifted sigma."""
    t = torch.tensor([0, 1, 100, 261, 500, 999])
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    eps = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sd3_scheduler.set_timesteps(sigmas=(t / 1000).tolist())  # the scheduler applies its own shift to these
    expected = sd3_scheduler.scale_noise(x0, sd3_scheduler.timesteps, eps)
    torch.testing.assert_close(sd3.add_noise(x0, eps, t), expected, rtol=0, atol=1e-6)
    # the denoiser's timestep is the scheduler's (sigma x 1000); sigma is the shift formula by hand
    torch.testing.assert_close(sd3.noise.model_timestep(t), sd3_scheduler.timesteps, rtol=0, atol=1e-4)
    torch.testing.assert_close(sd3_scheduler.sigmas[:-1].double(), _sigma(t), rtol=0, atol=1e-6)


def test_static_shift_matches_the_schedulers_training_sigmas(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    t = torch.arange(1000, 0, -1).float()  # the scheduler's 1000 training sigmas: t / 1000, shifted
    torch.testing.assert_close(sd3.noise.sigma(t), scheduler.sigmas, rtol=0, atol=1e-6)
    assert sd3.sigma(261) == pytest.approx(3 * 0.261 / (1 + 2 * 0.261), abs=1e-6)


def test_t0_is_exactly_clean_and_t999_is_almost_pure_noise(sd3):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sd3.add_noise(x0, eps, torch.tensor([0, 0])), x0)
    sigma = 2.997 / 2.998  # 3 u / (1 + 2 u) at u = 0.999
    xt = sd3.add_noise(x0, eps, torch.tensor([999, 999]))
    torch.testing.assert_close(xt, (1 - sigma) * x0 + sigma * eps, rtol=0, atol=1e-6)
    assert (xt - eps).abs().max() < 2e-3


def test_clean_extraction_draws_no_noise_and_is_the_frozen_forward_at_timestep_0(sd3, sd3_pipe):
    images = _images()
    state = torch.get_rng_state()
    clean = CleanExtractor(sd3, timestep=0, taps="all")(images, prompts="a cat")
    assert torch.equal(torch.get_rng_state(), state)
    # by hand: SD3 latents (z - shift_factor) * scaling_factor, then the plain transformer at timestep 0
    with torch.no_grad():
        z = sd3_pipe.vae.encode(images).latent_dist.mean
    x0 = (z - 0.0609) * 1.5035
    cond = sd3.encode_prompts("a cat", 2)
    inputs = dict(hidden_states=x0, timestep=torch.zeros(2), encoder_hidden_states=cond.hidden_states,
                  pooled_projections=cond["pooled_projections"])
    ref = _plain_forward_taps(sd3_pipe.transformer, inputs, patch=2)
    for k in range(4):
        torch.testing.assert_close(clean[f"block{k}"], ref[k], rtol=0, atol=1e-5)
    # a flow model's t = 0 is the clean latent: noisy extraction at t = 0 is the same forward
    noisy = NoisyExtractor(sd3, t=0, ensemble=2, sample_posterior=False, taps="all")(
        images, prompts="a cat", generator=torch.Generator().manual_seed(0))
    for name, feat in clean.items():
        torch.testing.assert_close(noisy[name], feat, rtol=0, atol=1e-5)


def test_noisy_ensemble_is_the_mean_of_its_draws(sd3):
    images = _images(n=1)
    noise = torch.randn(3, 1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ensemble = NoisyExtractor(sd3, t=261, ensemble=3, sample_posterior=False)
    ens = ensemble.extract(images, noise=noise)["block2"]
    single = NoisyExtractor(sd3, t=261, ensemble=1, sample_posterior=False)
    singles = [single.extract(images, noise=noise[k:k + 1])["block2"] for k in range(3)]
    torch.testing.assert_close(ens, torch.stack(singles).mean(0), rtol=0, atol=1e-5)
    assert not torch.allclose(singles[0], singles[1])


def test_bad_image_sizes_get_clear_errors(sd3):
    with pytest.raises(ValueError, match="multiple of 4"):
        CleanExtractor(sd3)(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="largest side of 96 px"):
        CleanExtractor(sd3)(torch.zeros(1, 3, 100, 32))
    assert CleanExtractor(sd3)(torch.zeros(1, 3, 96, 36))["block2"].shape == (1, 32, 24, 9)


@pytest.mark.parametrize("prompts", [5, [1], b"a cat", [b"a cat"], torch.zeros(1)])
def test_wrong_prompt_type_is_a_clear_error(sd3, prompts):
    with pytest.raises(TypeError, match="prompts must be a string, a list of strings or None"):
        CleanExtractor(sd3)(_images(n=1), prompts=prompts)


def test_release_prompt_encoder_frees_all_three_and_keeps_the_prompts(sd3_dir, sd3):
    backbone = load_backbone(str(sd3_dir))
    encoders = (backbone.text_encoder, backbone.text_encoder_2, backbone.text_encoder_3)
    expected = sum(nbytes(m) for m in encoders)
    kept = backbone.encode_prompts("", 1)
    assert backbone.release_prompt_encoder([""]) == expected > 0
    assert backbone.text_encoder is None and backbone.pipe.text_encoder_3 is None
    assert torch.equal(backbone.encode_prompts(None, 1).hidden_states, kept.hidden_states)
    with pytest.raises(RuntimeError, match="was not encoded before the prompt encoder was released"):
        backbone.encode_prompts("a cat", 1)
