"""Flux.1: tiny real-architecture pipelines (dev-like and schnell-like) saved as diffusers folders and loaded
through ``load_backbone``; every convention is checked against diffusers' own ``FluxPipeline`` / scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cleandift import CleanExtractor, NoisyExtractor, load_backbone
from cleandift.backbones.flux import FluxBackbone, flux_taps
from cleandift.testing import tiny_flux


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """FLUX.1-dev layout: guidance embedding, dynamic shift."""
    return tiny_flux.save(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    """FLUX.1-schnell layout: no guidance embedding, static shift 1."""
    return tiny_flux.save(tmp_path_factory.mktemp("schnell"), seed=5, guidance_embeds=False,
                          use_dynamic_shifting=False)


@pytest.fixture(scope="module")
def flux(flux_dir):
    return load_backbone(str(flux_dir))


@pytest.fixture(scope="module")
def schnell(schnell_dir):
    return load_backbone(str(schnell_dir))


def _pipe(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def flux_pipe(flux_dir):
    """The same folder loaded by diffusers alone: the reference for every convention."""
    return _pipe(flux_dir)


@pytest.fixture(scope="module")
def schnell_pipe(schnell_dir):
    return _pipe(schnell_dir)


def _images(h=32, w=32, n=2):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _scheduler(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


def _mu(pipe, seq_len: int) -> float:
    """``mu`` exactly as ``FluxPipeline.__call__`` computes it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = pipe.scheduler.config
    return calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def _scheduler_sigmas(pipe, t: list[int], seq_len: int) -> torch.Tensor:
    """Shifted sigmas of user timesteps ``t`` from ``scheduler.set_timesteps(sigmas=t / 1000, mu=...)``."""
    sched = _scheduler(pipe)
    sched.set_timesteps(sigmas=[k / 1000 for k in t], mu=_mu(pipe, seq_len))
    return sched.sigmas[:-1]


def _reference_block_maps(pipe, x, sigma, prompts, guidance):
    """Each block's image stream in a plain forward, called as ``FluxPipeline.__call__`` calls it."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, device="cpu",
                                                      max_sequence_length=512)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype)
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    seen: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o[1]))
             for k, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=sigma,
                             guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
                             txt_ids=text_ids, img_ids=img_ids, return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    # image tokens (B, h/2 * w/2, C) in row-major order -> (B, C, h/2, w/2), by hand
    return {f"block{k}": tokens.reshape(b, h // 2, w // 2, -1).permute(0, 3, 1, 2)
            for k, tokens in seen.items()}


# ------------------------------------------------------------------------------------ loading / taps
def test_folder_loads_as_flux_with_its_tap_table(flux):
    assert isinstance(flux, FluxBackbone)
    assert flux.family == "flux" and flux.latent_factor == 2
    assert flux.resolution == 128 * 2  # FluxPipeline's default_sample_size x vae_scale_factor
    # 2 double + 2 single blocks, inner_dim = 2 heads x 16, one token per 2x2 latent cell
    assert [(t.name, t.module, t.channels, t.stride, t.layout, t.stream) for t in flux.taps] == [
        ("block0", "transformer_blocks.0", 32, 2, "tokens", 1),
        ("block1", "transformer_blocks.1", 32, 2, "tokens", 1),
        ("block2", "single_transformer_blocks.0", 32, 2, "tokens", 1),
        ("block3", "single_transformer_blocks.1", 32, 2, "tokens", 1)]
    assert flux.default_feature_taps == ("block2",) == flux.taps.default  # no block28: the middle block
    assert flux.size_multiple == 4 and flux.latent_channels == 4
    assert flux.input_shape((32, 48)) == (4, 16, 24)  # unpacked latents
    desc = flux.describe()
    assert desc["noise_process"] == "rectified-flow" and desc["shift"] == "dynamic"
    assert desc["timestep_scale"] == 1.0 and desc["guidance"] == 3.5
    assert desc["unet_class"] == "FluxTransformer2DModel"


def test_full_size_flux_defaults_to_ditf_block28_a_single_block():
    """FLUX.1 has 19 double + 38 single blocks: block28 is the 10th single block (DiTF's map)."""
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList(nn.Identity() for _ in range(19))
    model.single_transformer_blocks = nn.ModuleList(nn.Identity() for _ in range(38))
    model.inner_dim = 3072
    table = flux_taps(model)
    assert len(table) == 57 and table.default == ("block28",)
    assert table["block28"].module == "single_transformer_blocks.9"
    assert table["block18"].module == "transformer_blocks.18"
    assert (table["block28"].channels, table["block28"].stride) == (3072, 2)


def test_schnell_has_no_guidance_and_a_static_shift(schnell):
    assert not schnell.has_guidance and schnell.describe()["guidance"] is None
    assert schnell.describe()["shift"] == 1.0
    inputs = schnell.denoiser_inputs(torch.zeros(2, 4, 4, 4), torch.zeros(2), schnell.encode_prompts(None, 2))
    assert inputs["guidance"] is None
    # shift 1: sigma is t / 1000 whatever the image size
    t = torch.tensor([0, 1, 261, 999])
    x = torch.zeros(4, 4, 16, 16)
    sigma = schnell.noise.sigma(t, seq_len=schnell.token_count(x))
    torch.testing.assert_close(sigma, t / 1000, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ conditioning
def test_empty_prompt_is_the_pipelines_encoding_of_empty(flux, flux_pipe):
    cond = flux.encode_prompts(None, 2)
    with torch.no_grad():  # as FluxPipeline.__call__ runs (T5 takes another kernel path under autograd)
        embeds, pooled, text_ids = flux_pipe.encode_prompt("", prompt_2=None, device="cpu",
                                                           max_sequence_length=512)
    assert cond.hidden_states.shape == (2, 512, 32) and cond["pooled_projections"].shape == (2, 32)
    assert torch.equal(cond.hidden_states, embeds.expand(2, -1, -1))  # T5, 512 tokens
    assert torch.equal(cond["pooled_projections"], pooled.expand(2, -1))  # CLIP pooler_output
    assert torch.equal(cond["txt_ids"], text_ids.expand(2, -1, -1)) and not cond["txt_ids"].any()
    again = flux.encode_prompts([""], 1)
    assert torch.equal(again.hidden_states, cond.hidden_states[:1])
    other = flux.encode_prompts("a cat", 1)
    assert not torch.equal(other.hidden_states, again.hidden_states)


def test_denoiser_inputs_pack_2x2_cells_with_the_pipelines_ids_and_guidance(flux):
    x = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.25])
    cond = flux.encode_prompts(None, 1)
    inputs = flux.denoiser_inputs(x, sigma, cond)
    packed = inputs["hidden_states"]
    assert packed.shape == (1, 2 * 3, 16)
    # token (row r, col c) holds the 2x2 cell's values in (channel, dy, dx) order
    for r in range(2):
        for c in range(3):
            assert torch.equal(packed[0, r * 3 + c], x[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1))
    assert torch.equal(inputs["img_ids"], torch.tensor([[0.0, r, c] for r in range(2) for c in range(3)]))
    assert inputs["guidance"].dtype == torch.float32 and torch.equal(inputs["guidance"], torch.tensor([3.5]))
    assert inputs["timestep"] is sigma and inputs["txt_ids"].shape == (512, 3)
    assert inputs["encoder_hidden_states"] is cond.hidden_states
    assert inputs["pooled_projections"] is cond["pooled_projections"]
    with pytest.raises(ValueError, match="even"):
        flux.denoiser_inputs(torch.zeros(1, 4, 5, 6), sigma, cond)


# ------------------------------------------------------------------------------------ taps
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_taps_equal_block_outputs_of_a_plain_forward_and_early_stop_changes_nothing(variant, request):
    backbone = request.getfixturevalue("flux" if variant == "dev" else "schnell")
    pipe = request.getfixturevalue("flux_pipe" if variant == "dev" else "schnell_pipe")
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    t = [10, 500]
    prompts = ["a dog", ""]
    cond = backbone.encode_prompts(prompts, 2)
    ours = backbone.run_taps(x, torch.tensor(t), cond, backbone.taps.select("all"))
    sigma = _scheduler_sigmas(pipe, t, seq_len=4 * 6)
    guidance = torch.full([2], 3.5) if variant == "dev" else None
    ref = _reference_block_maps(pipe, x, sigma, prompts, guidance)
    assert set(ours) == set(ref) == {"block0", "block1", "block2", "block3"}
    for name, feat in ours.items():
        assert feat.shape == (2, 32, 4, 6)
        torch.testing.assert_close(feat, ref[name], rtol=0, atol=1e-5)
    early = backbone.run_taps(x, torch.tensor(t), cond, backbone.taps.select("block1"))
    assert torch.equal(early["block1"], ours["block1"])


def test_early_stop_runs_nothing_after_the_last_tap(flux):
    calls = []
    later = [flux.denoiser.single_transformer_blocks[0], flux.denoiser.norm_out, flux.denoiser.proj_out]
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in later]
    try:
        feats = flux.run_taps(torch.zeros(1, 4, 8, 8), 5.0, flux.encode_prompts(None, 1),
                              flux.taps.select("block1"))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [] and feats["block1"].shape == (1, 32, 4, 4)


# ------------------------------------------------------------------------------------ noise
def test_add_noise_is_the_schedulers_scale_noise_at_the_same_sigma(flux, flux_pipe):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 12, generator=g), torch.randn(3, 4, 8, 12, generator=g)
    t = [1, 261, 999]
    sched = _scheduler(flux_pipe)
    sched.set_timesteps(sigmas=[k / 1000 for k in t], mu=_mu(flux_pipe, 24))  # 4 x 6 packed tokens
    ref = sched.scale_noise(x0, sched.timesteps, eps)  # one timestep per sample
    ours = flux.add_noise(x0, eps, torch.tensor(t))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    for k, tk in enumerate(t):
        assert flux.sigma(tk, x0) == pytest.approx(float(sched.sigmas[k]), abs=1e-6)


@pytest.mark.parametrize("latent_side", [8, 32, 128])  # 16, 256 and 4096 packed tokens
def test_sigma_follows_the_pipelines_dynamic_shift(flux, flux_pipe, latent_side):
    tokens = (latent_side // 2) ** 2
    x = torch.empty(1, 4, latent_side, latent_side)
    t = [999, 750, 500, 261, 1]
    ours = torch.stack([flux.noise.sigma(torch.tensor(k), seq_len=flux.token_count(x)) for k in t])
    torch.testing.assert_close(ours, _scheduler_sigmas(flux_pipe, t, tokens), rtol=0, atol=1e-6)
    # by hand: mu runs linearly from 0.5 at 256 tokens to 1.15 at 4096; sigma(t=500) = e^mu / (e^mu + 1)
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    assert flux.sigma(500, x) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1), abs=1e-6)
    assert flux.noise.describe(tokens)["mu"] == pytest.approx(mu)


def test_t0_is_exactly_the_clean_latent_and_t999_almost_pure_noise(flux):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(flux.add_noise(x0, eps, torch.zeros(2, dtype=torch.long)), x0)
    assert flux.sigma(0, x0) == 0.0
    # 16 tokens: mu = 0.5 - 240 * 0.65 / 3840; sigma(999) = e^mu / (e^mu + 1/0.999 - 1)
    mu = 0.5 - 240 * 0.65 / 3840
    expected = math.exp(mu) / (math.exp(mu) + 1 / 0.999 - 1)
    assert flux.sigma(999, x0) == pytest.approx(expected, abs=1e-6) and expected > 0.999
    xt = flux.add_noise(x0, eps, torch.full((2,), 999))
    torch.testing.assert_close(xt, expected * eps + (1 - expected) * x0, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ extraction
def test_clean_extraction_draws_no_noise_and_is_the_frozen_forward_at_timestep_0(flux, flux_pipe):
    images = _images()
    state = torch.get_rng_state()
    feats = CleanExtractor(flux, timestep=0)(images, prompts="a cat")
    assert torch.equal(torch.get_rng_state(), state)
    assert set(feats) == {"block2"} and feats["block2"].shape == (2, 32, 8, 8)
    # the clean latent, normalised as the Flux pipeline does: (z - shift_factor) * scaling_factor
    with torch.no_grad():
        z = flux_pipe.vae.encode(images).latent_dist.mean
    x0 = (z - 0.1159) * 0.3611
    torch.testing.assert_close(flux.encode_images(images), x0, rtol=0, atol=1e-6)
    ref = _reference_block_maps(flux_pipe, x0, torch.zeros(2), ["a cat"] * 2, torch.full([2], 3.5))
    torch.testing.assert_close(feats["block2"], ref["block2"], rtol=0, atol=1e-5)


def test_noisy_t0_equals_clean_t0(flux):
    """Flow: t = 0 is sigma = 0, the clean latent itself, so DIFT at t = 0 is the clean forward."""
    images = _images()
    clean = CleanExtractor(flux, timestep=0)(images, taps="block0,block3")
    noisy = NoisyExtractor(flux, t=0, ensemble=2, sample_posterior=False)(
        images, taps="block0,block3", generator=torch.Generator().manual_seed(0))
    for name in ("block0", "block3"):
        torch.testing.assert_close(noisy[name], clean[name], rtol=0, atol=1e-6)


def test_noisy_ensemble_is_the_mean_of_its_draws(flux):
    images = _images(n=1)
    noise = torch.randn(3, 1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ens = NoisyExtractor(flux, t=261, ensemble=3, sample_posterior=False).extract(images, noise=noise)
    one = NoisyExtractor(flux, t=261, ensemble=1, sample_posterior=False)
    singles = [one.extract(images, noise=noise[k:k + 1])["block2"] for k in range(3)]
    ens = ens["block2"]
    torch.testing.assert_close(ens, torch.stack(singles).mean(0), rtol=0, atol=1e-5)
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)  # the draws differ: the mean is not trivial


def test_image_size_must_fit_the_packed_token_grid(flux):
    with pytest.raises(ValueError, match="multiple of 4"):
        CleanExtractor(flux)(torch.zeros(1, 3, 34, 40))


def test_wrong_prompt_type_is_a_clear_error(flux):
    with pytest.raises(TypeError, match="prompts must be a string, a list of strings or None, got int"):
        CleanExtractor(flux)(_images(n=1), prompts=5)
    with pytest.raises(TypeError, match="got list holding int, str"):
        NoisyExtractor(flux, ensemble=1)(_images(n=2), prompts=["a cat", 7])


def test_released_prompt_encoder_keeps_the_empty_prompt(tmp_path):
    backbone = FluxBackbone(tiny_flux.build(tmp_path))
    before = backbone.encode_prompts(None, 1)
    expected = sum(p.numel() * p.element_size() for enc in (backbone.text_encoder, backbone.text_encoder_2)
                   for p in [*enc.parameters(), *enc.buffers()])
    assert backbone.release_prompt_encoder([""]) == expected
    assert backbone.pipe.text_encoder is None and backbone.pipe.text_encoder_2 is None
    after = backbone.encode_prompts(None, 1)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(RuntimeError, match="released"):
        backbone.encode_prompts("a cat", 1)
