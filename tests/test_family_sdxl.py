"""SDXL: a tiny real-architecture pipeline saved as a diffusers folder and loaded through ``load_backbone``."""

from __future__ import annotations

import pytest
import torch

from cleandift import CleanExtractor, NoisyExtractor, load_backbone
from cleandift.backbones.sdxl import StableDiffusionXLBackbone
from cleandift.taps import capture_taps
from cleandift.testing import tiny_sdxl


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return tiny_sdxl.save(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load_backbone(str(sdxl_dir))


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    """The same folder loaded by diffusers alone: the reference for every convention."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), local_files_only=True)


def _images(h=64, w=64, n=2):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_folder_loads_as_sdxl_with_its_tap_table(sdxl):
    assert isinstance(sdxl, StableDiffusionXLBackbone)
    assert sdxl.family == "sdxl" and sdxl.latent_factor == 2 and sdxl.resolution == 32
    # 3 up levels x 3 layers: (channels, stride) by hand from UNET's block_out_channels (32, 32, 64)
    expected = {"mid": (64, 4), "us1": (64, 4), "us2": (64, 4), "us3": (64, 2), "us4": (32, 2), "us5": (32, 2),
                "us6": (32, 1), "us7": (32, 1), "us8": (32, 1), "us9": (32, 1)}
    assert {t.name: (t.channels, t.stride) for t in sdxl.taps} == expected
    assert sdxl.taps["us3"].module == "up_blocks.0.upsamplers.0"
    assert sdxl.default_feature_taps == ("us2",) and sdxl.size_multiple == 8
    assert sdxl.describe()["noise_process"] == "variance-preserving"


def test_empty_prompt_is_the_pipelines_encoding_of_empty(sdxl, sdxl_pipe):
    cond = sdxl.encode_prompts(None, 2)
    embeds, neg, pooled, neg_pooled = sdxl_pipe.encode_prompt("", device="cpu", num_images_per_prompt=1,
                                                               do_classifier_free_guidance=False)
    assert neg is None and neg_pooled is None
    assert torch.equal(cond.hidden_states, embeds.expand(2, -1, -1))
    assert torch.equal(cond["text_embeds"], pooled.expand(2, -1))
    # second-to-last hidden states of both encoders, joined on the feature axis: 32 + 32 channels
    assert cond.hidden_states.shape == (2, 77, 64)
    assert not torch.equal(cond["text_embeds"], torch.zeros_like(cond["text_embeds"]))  # not the zeroed negative


def test_time_ids_are_original_crop_target_size(sdxl):
    cond = sdxl.encode_prompts("a cat", 3)
    inputs = sdxl.denoiser_inputs(torch.zeros(3, 4, 24, 32), torch.zeros(3), cond)
    expected = torch.tensor([[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]]).expand(3, -1)
    assert torch.equal(inputs["added_cond_kwargs"]["time_ids"], expected)
    assert torch.equal(inputs["added_cond_kwargs"]["text_embeds"], cond["text_embeds"])


def test_taps_equal_block_outputs_of_a_plain_forward_and_early_stop_changes_nothing(sdxl, sdxl_pipe):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    cond = sdxl.encode_prompts(["a dog", ""], 2)
    taps = sdxl.taps.select("all")
    ours = sdxl.run_taps(x, t, cond, taps)
    # reference: diffusers' own U-Net called as the pipeline calls it, hooks on the modules by name
    add_time_ids = sdxl_pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=torch.float32,
                                               text_encoder_projection_dim=32).repeat(2, 1)
    seen = {}
    hooks = [sdxl_pipe.unet.get_submodule(tap.module).register_forward_hook(
        lambda m, i, o, name=tap.name: seen.__setitem__(name, o[0] if isinstance(o, tuple) else o)) for tap in taps]
    try:
        with torch.no_grad():
            sdxl_pipe.unet(x, t, encoder_hidden_states=cond.hidden_states,
                           added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": add_time_ids})
    finally:
        for h in hooks:
            h.remove()
    for name, feat in ours.items():
        ref = seen[name].sample if hasattr(seen[name], "sample") else seen[name]
        torch.testing.assert_close(feat, ref, rtol=0, atol=1e-5)
    early = sdxl.run_taps(x, t, cond, sdxl.taps.select("us2"))
    assert torch.equal(early["us2"], ours["us2"])


def test_early_stop_runs_nothing_after_the_last_tap(sdxl):
    calls = []
    hook = sdxl.denoiser.up_blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        sdxl.run_taps(torch.zeros(1, 4, 16, 16), 5.0, sdxl.encode_prompts(None, 1), sdxl.taps.select("us2"))
    finally:
        hook.remove()
    assert calls == []
    with capture_taps(sdxl.denoiser, sdxl.taps.select("us9"), stop_early=False):
        pass  # hooks install and remove on a plain U-Net table


def test_clean_extraction_draws_no_noise_and_is_the_frozen_forward(sdxl):
    images = _images()
    state = torch.get_rng_state()
    feats = CleanExtractor(sdxl, timestep=0)(images, prompts="a cat")
    assert torch.equal(torch.get_rng_state(), state)
    x0 = sdxl.encode_images(images)
    ref = sdxl.run_taps(x0, torch.zeros(2), sdxl.encode_prompts("a cat", 2), sdxl.taps.select("us2"))
    torch.testing.assert_close(feats["us2"], ref["us2"], rtol=0, atol=1e-6)


def test_noisy_ensemble_is_the_mean_of_its_draws(sdxl):
    images = _images(n=1)
    noise = torch.randn(3, 1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    ens = NoisyExtractor(sdxl, t=261, ensemble=3, sample_posterior=False).extract(images, noise=noise)["us2"]
    singles = [NoisyExtractor(sdxl, t=261, ensemble=1, sample_posterior=False).extract(images, noise=noise[k:k + 1])
               ["us2"] for k in range(3)]
    torch.testing.assert_close(ens, torch.stack(singles).mean(0), rtol=0, atol=1e-5)


def test_latents_mean_and_std_normalise_like_the_pipeline():
    """SDXL VAEs with ``latents_mean``/``latents_std``: ``(z - mean) * sf / std`` (img2img ``prepare_latents``)."""
    from cleandift.backbones.latents import LatentBackbone
    from cleandift.testing import components

    mean, std = [0.5, -0.25, 0.0, 1.0], [2.0, 0.5, 1.0, 4.0]
    vae = components.vae(latents_mean=mean, latents_std=std, scaling_factor=0.5)
    affine = LatentBackbone._latent_affine(type("B", (), {"vae": vae, "scaling_factor": 0.5})(), torch.zeros(1))
    z = torch.randn(1, 4, 2, 2)
    shift, scale = affine
    expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) * 0.5 / torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close((z - shift) * scale, expected)


def test_image_size_must_fit_the_coarsest_cell(sdxl):
    with pytest.raises(ValueError, match="multiple of 8"):
        CleanExtractor(sdxl)(torch.zeros(1, 3, 36, 40))
