"""PixArt-Sigma / -Alpha: tiny real-architecture pipelines saved as folders, loaded by ``load_backbone``.

Every expectation comes from diffusers itself (the same folder loaded by the pipeline class, its
``encode_prompt``, its ``__call__``'s transformer inputs, plain transformer forwards with hooks) or by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from cleandift import CleanExtractor, NoisyExtractor, load_backbone
from cleandift.backbones.pixart import PixArtBackbone
from cleandift.testing import tiny_pixart


@pytest.fixture(scope="module")
def sigma_dir(tmp_path_factory):
    return tiny_pixart.save(tmp_path_factory.mktemp("pixart-sigma"))


@pytest.fixture(scope="module")
def alpha_dir(tmp_path_factory):
    """The Alpha-1024 layout: ``sample_size=128``, so the transformer embeds resolution and aspect ratio."""
    return tiny_pixart.save(tmp_path_factory.mktemp("pixart-alpha"), alpha=True, sample_size=128)


@pytest.fixture(scope="module")
def sigma(sigma_dir):
    return load_backbone(str(sigma_dir))


@pytest.fixture(scope="module")
def alpha(alpha_dir):
    return load_backbone(str(alpha_dir))


@pytest.fixture(scope="module")
def sigma_pipe(sigma_dir):
    """The same folder loaded by diffusers alone: the reference for every convention."""
    from diffusers import PixArtSigmaPipeline

    return PixArtSigmaPipeline.from_pretrained(str(sigma_dir), local_files_only=True)


@pytest.fixture(scope="module")
def alpha_pipe(alpha_dir):
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline.from_pretrained(str(alpha_dir), local_files_only=True)


def _images(h=32, w=48, n=2):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _block_outputs(transformer, inputs: dict) -> dict[str, torch.Tensor]:
    """A plain diffusers forward with hooks on every block; image tokens ``(B, N, C)`` reshaped by hand."""
    b, _, h, w = inputs["hidden_states"].shape
    p = transformer.config.patch_size
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"block{k}", o))
             for k, block in enumerate(transformer.transformer_blocks)]
    try:
        with torch.no_grad():
            transformer(**inputs, return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: v.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2) for k, v in seen.items()}


def _pipeline_transformer_call(pipe, height: int, width: int) -> dict:
    """Keyword arguments the pipeline's own ``__call__`` gives its transformer (prompt ``""``, first step)."""
    captured = {}

    class Captured(Exception):
        pass

    def hook(_module, args, kwargs):
        captured.update(kwargs, hidden_states=args[0] if args else kwargs["hidden_states"])
        raise Captured  # the transformer's inputs are all we need: stop the sampling loop here

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(Captured):
            pipe("", num_inference_steps=2, guidance_scale=1.0, height=height, width=width,
                 output_type="latent", use_resolution_binning=False,
                 generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    captured.pop("return_dict", None)
    return captured


def test_folders_load_as_pixart_with_block_taps(sigma, alpha):
    assert isinstance(sigma, PixArtBackbone) and isinstance(alpha, PixArtBackbone)
    assert (sigma.family, sigma.name, alpha.name) == ("pixart", "pixart-sigma", "pixart-alpha")
    # 4 blocks of inner_dim 3 heads x 8 = 24 channels, one token per 2x2 latent patch
    assert [(t.name, t.module, t.channels, t.stride, t.layout) for t in sigma.taps] == [
        (f"block{k}", f"transformer_blocks.{k}", 24, 2, "tokens") for k in range(4)]
    assert sigma.default_feature_taps == ("block2",) and sigma.taps.default == ("block2",)
    # sample_size 8 / 128 latents x VAE factor 2; image sides: latent factor 2 x patch 2
    assert (sigma.resolution, alpha.resolution, sigma.size_multiple, sigma.latent_channels) == (16, 256, 4, 4)
    assert sigma.token_grid(torch.zeros(1, 4, 16, 24)) == (8, 12)
    described = sigma.describe()
    assert described["noise_process"] == "variance-preserving" and described["max_sequence_length"] == 300
    assert alpha.max_sequence_length == 120  # PixArtAlphaPipeline.encode_prompt's own default


def test_block10_is_the_default_feature_tap_when_the_model_has_it(tmp_path):
    deep = PixArtBackbone(tiny_pixart.build(tmp_path, num_layers=12))
    assert deep.default_feature_taps == ("block10",)  # DistillDIFT's PixArt block
    assert deep.taps.default == ("block6",)  # the table's (distillation) default: the middle block


def test_empty_prompt_is_the_pipelines_encoding_of_empty(sigma, sigma_pipe, alpha, alpha_pipe):
    cond = sigma.encode_prompts(None, 2)
    embeds, mask, neg, neg_mask = sigma_pipe.encode_prompt(
        "", do_classifier_free_guidance=False, device="cpu", max_sequence_length=300, clean_caption=False)
    assert neg is None and neg_mask is None
    assert torch.equal(cond.hidden_states, embeds.expand(2, -1, -1))
    assert torch.equal(cond["encoder_attention_mask"], mask.expand(2, -1))
    assert cond.hidden_states.shape == (2, 300, 32)
    # "" tokenizes to "</s>" alone: one attended token, 299 masked
    assert cond["encoder_attention_mask"].dtype == torch.int64
    assert cond["encoder_attention_mask"].sum(1).tolist() == [1, 1]
    half = cond.to(dtype=torch.float16)  # a dtype cast keeps the mask an integer mask
    assert half.hidden_states.dtype == torch.float16 and half["encoder_attention_mask"].dtype == torch.int64
    embeds_a, mask_a, _, _ = alpha_pipe.encode_prompt("", do_classifier_free_guidance=False, device="cpu")
    cond_a = alpha.encode_prompts("", 1)
    assert cond_a.hidden_states.shape == (1, 120, 32)
    assert torch.equal(cond_a.hidden_states, embeds_a)
    assert torch.equal(cond_a["encoder_attention_mask"], mask_a)


@pytest.mark.parametrize("which", ["sigma", "alpha"])
def test_denoiser_inputs_are_what_the_pipeline_gives_its_transformer(which, request):
    backbone, pipe = request.getfixturevalue(which), request.getfixturevalue(f"{which}_pipe")
    ref = _pipeline_transformer_call(pipe, height=32, width=48)
    ours = backbone.denoiser_inputs(ref["hidden_states"], ref["timestep"], backbone.encode_prompts("", 1))
    assert sorted(ours) == sorted(ref)
    for key in ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"):
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key
    added, ref_added = ours["added_cond_kwargs"], ref["added_cond_kwargs"]
    if which == "sigma":
        assert added == ref_added == {"resolution": None, "aspect_ratio": None}
    else:  # sample_size 128: pixel (height, width) and height / width, by hand
        assert torch.equal(added["resolution"], torch.tensor([[32.0, 48.0]]))
        assert torch.equal(added["aspect_ratio"], torch.tensor([[32 / 48]]))
        for key in ("resolution", "aspect_ratio"):
            assert torch.equal(added[key], ref_added[key])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**ours, return_dict=False)[0],
                                   pipe.transformer(**ref, return_dict=False)[0], rtol=0, atol=0)


def test_resolution_conditions_change_the_alpha_features(alpha):
    """The added conditions are live in the 128-layout model: its taps depend on them."""
    x = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    cond = alpha.encode_prompts("", 1)
    inputs = alpha.denoiser_inputs(x, torch.tensor([100.0]), cond)
    tall = alpha.added_cond_kwargs(torch.zeros(3, 4, 24, 16), torch.float16)  # 48 x 32 px
    assert tall["aspect_ratio"].dtype == torch.float16 and tall["aspect_ratio"].tolist() == [[1.5]] * 3
    other = dict(inputs, added_cond_kwargs={"resolution": torch.tensor([[64.0, 64.0]]),
                                            "aspect_ratio": torch.tensor([[1.0]])})
    assert not torch.allclose(_block_outputs(alpha.denoiser, inputs)["block0"],
                              _block_outputs(alpha.denoiser, other)["block0"])


@pytest.mark.parametrize("which", ["sigma", "alpha"])
def test_taps_equal_block_outputs_of_a_plain_forward_and_early_stop_changes_nothing(which, request):
    backbone, pipe = request.getfixturevalue(which), request.getfixturevalue(f"{which}_pipe")
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    cond = backbone.encode_prompts(["a dog", ""], 2)
    ours = backbone.run_taps(x, t, cond, backbone.taps.select("all"))
    embeds, mask, _, _ = pipe.encode_prompt(["a dog", ""], do_classifier_free_guidance=False, device="cpu")
    added = {"resolution": None, "aspect_ratio": None}
    if which == "alpha":
        added = {"resolution": torch.tensor([[32.0, 48.0]] * 2),
                 "aspect_ratio": torch.tensor([[32 / 48]] * 2)}
    ref = _block_outputs(pipe.transformer, dict(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                                                encoder_attention_mask=mask, added_cond_kwargs=added))
    assert list(ours) == [f"block{k}" for k in range(4)]
    for name, feat in ours.items():
        assert feat.shape == (2, 24, 8, 12)
        torch.testing.assert_close(feat, ref[name], rtol=0, atol=1e-6)
    early = backbone.run_taps(x, t, cond, backbone.taps.select("block1"))
    assert torch.equal(early["block1"], ours["block1"])


def test_early_stop_runs_nothing_after_the_last_tap(sigma):
    calls = []
    hooks = [sigma.denoiser.transformer_blocks[2].register_forward_hook(lambda *a: calls.append("block2")),
             sigma.denoiser.proj_out.register_forward_hook(lambda *a: calls.append("proj_out"))]
    try:
        args = (torch.zeros(1, 4, 8, 8), 5.0, sigma.encode_prompts(None, 1), sigma.taps.select("block1"))
        sigma.run_taps(*args)
        assert calls == []
        sigma.run_taps(*args, stop_early=False)
        assert calls == ["block2", "proj_out"]
    finally:
        for hook in hooks:
            hook.remove()


def test_noise_process_is_ddpm_on_the_pipelines_linear_betas(sigma, sigma_pipe):
    from diffusers import DDPMScheduler

    assert torch.equal(sigma.scheduler.alphas_cumprod, sigma_pipe.scheduler.alphas_cumprod)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 261, 999])
    ddpm = DDPMScheduler.from_config(sigma_pipe.scheduler.config)
    torch.testing.assert_close(sigma.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), rtol=0, atol=1e-6)
    # by hand: linear betas 1e-4 .. 0.02 -> sqrt(1 - abar_0) = sqrt(1e-4) = 0.01
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    assert sigma.sigma(0) == pytest.approx(0.01, rel=1e-4)  # abar in float32
    assert sigma.sigma(999) == pytest.approx(math.sqrt(1 - abar[999].item()), rel=1e-6)
    almost_noise = sigma.add_noise(x0, eps, torch.tensor([999] * 3))
    assert (almost_noise - eps).abs().max() < 0.01 * x0.abs().max() + 1e-4  # sqrt(abar_999) = 0.0064
    assert torch.equal(sigma.noise.model_timestep(t.float()), t.float())  # the transformer gets t itself


def test_clean_extraction_at_t0_is_the_frozen_transformer_on_the_clean_latent(sigma, sigma_pipe):
    images = _images()
    state = torch.get_rng_state()
    feats = CleanExtractor(sigma, timestep=0, taps="block1,block3")(images, prompts="a cat")
    assert torch.equal(torch.get_rng_state(), state)  # clean extraction draws no noise
    # reference from diffusers alone: VAE posterior mean * scaling_factor, timestep 0 as the pipeline's int64
    with torch.no_grad():
        x0 = sigma_pipe.vae.encode(images).latent_dist.mean * sigma_pipe.vae.config.scaling_factor
    embeds, mask, _, _ = sigma_pipe.encode_prompt("a cat", do_classifier_free_guidance=False, device="cpu")
    ref = _block_outputs(sigma_pipe.transformer, dict(
        hidden_states=x0, timestep=torch.zeros(2, dtype=torch.long),
        encoder_hidden_states=embeds.expand(2, -1, -1), encoder_attention_mask=mask.expand(2, -1),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}))
    for name in ("block1", "block3"):
        torch.testing.assert_close(feats[name], ref[name], rtol=0, atol=1e-6)


def test_noisy_ensemble_is_the_mean_of_its_draws(sigma):
    images = _images(n=1)
    noise = torch.randn(3, 1, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    ensemble = NoisyExtractor(sigma, t=261, ensemble=3, sample_posterior=False)
    ens = ensemble.extract(images, noise=noise)["block2"]
    singles = [NoisyExtractor(sigma, t=261, ensemble=1, sample_posterior=False).extract(
        images, noise=noise[k:k + 1])["block2"] for k in range(3)]
    torch.testing.assert_close(ens, torch.stack(singles).mean(0), rtol=0, atol=1e-6)
    assert not torch.allclose(singles[0], singles[1])  # the draws differ, so the mean is a real average


def test_image_size_must_fit_the_patch_grid(sigma):
    with pytest.raises(ValueError, match="multiple of 4 px"):
        CleanExtractor(sigma)(torch.zeros(1, 3, 34, 40))
    with pytest.raises(ValueError, match="patch size 2"):
        sigma.token_grid(torch.zeros(1, 4, 17, 20))


@pytest.mark.parametrize("prompts", [5, torch.zeros(2), ["a cat", 3]])
def test_wrong_prompt_type_is_refused(sigma, prompts):
    with pytest.raises(TypeError, match="prompts must be a string, a list of strings or None"):
        CleanExtractor(sigma)(_images(), prompts=prompts)


def test_released_t5_keeps_the_kept_prompts(tmp_path):
    backbone = PixArtBackbone(tiny_pixart.build(tmp_path))
    before = backbone.encode_prompts("", 1)
    t5_bytes = sum(p.numel() * p.element_size() for p in backbone.text_encoder.parameters())
    assert backbone.release_prompt_encoder([""]) == t5_bytes
    assert backbone.text_encoder is None and backbone.pipe.text_encoder is None
    after = backbone.encode_prompts(None, 1)
    assert torch.equal(after.hidden_states, before.hidden_states)
    assert torch.equal(after["encoder_attention_mask"], before["encoder_attention_mask"])
    with pytest.raises(RuntimeError, match="released"):
        backbone.encode_prompts("a cat", 1)
