"""Clean and noisy (DIFT) extraction through one interface."""

from __future__ import annotations

import pytest
import torch

from cleandift.errors import TimestepError
from cleandift.extract import CleanExtractor, NoisyExtractor
from cleandift.taps import run_to_taps


def test_clean_extraction_is_deterministic_and_noise_free(tiny_backbone, tiny_images, monkeypatch):
    extractor = CleanExtractor(tiny_backbone, taps="mid,us6,us10")
    first = extractor(tiny_images, prompts="a photo of a cat")
    calls = []
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(1) or real_randn(*a, **k))
    monkeypatch.setattr(torch, "randn_like", lambda *a, **k: calls.append(1) or real_randn(a[0].shape))
    second = extractor(tiny_images, prompts="a photo of a cat")
    assert calls == []  # no noise anywhere in the clean path
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def test_clean_extraction_equals_manual_forward(tiny_backbone, tiny_images):
    """Clean = student on the VAE posterior mean latent at the fixed timestep; nothing else."""
    extractor = CleanExtractor(tiny_backbone, timestep=261, taps="us6")
    feats = extractor(tiny_images, prompts=["a", "b"])
    x0 = tiny_backbone.vae.encode(tiny_images).latent_dist.mean * 0.18215
    cond = tiny_backbone.encode_prompts(["a", "b"], 2)
    expected = run_to_taps(tiny_backbone.unet, x0, 261.0, cond, tiny_backbone.taps.select("us6"))["us6"]
    torch.testing.assert_close(feats["us6"], expected, rtol=1e-5, atol=1e-5)


def test_chunking_does_not_change_results(tiny_backbone, tiny_images):
    big = CleanExtractor(tiny_backbone, taps="us6", chunk_size=8)(tiny_images)
    small = CleanExtractor(tiny_backbone, taps="us6", chunk_size=1)(tiny_images)
    torch.testing.assert_close(big["us6"], small["us6"], rtol=1e-4, atol=1e-4)


def test_noisy_is_reproducible_at_fixed_seed(tiny_backbone, tiny_images):
    extractor = NoisyExtractor(tiny_backbone, t=261, ensemble=3, taps="us6")
    a = extractor(tiny_images, generator=torch.Generator().manual_seed(7))
    b = extractor(tiny_images, generator=torch.Generator().manual_seed(7))
    c = extractor(tiny_images, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a["us6"], b["us6"], rtol=0, atol=0)
    assert not torch.allclose(a["us6"], c["us6"])


def test_ensemble_equals_mean_of_its_draws(tiny_backbone, tiny_images):
    e = 4
    extractor = NoisyExtractor(tiny_backbone, t=400, ensemble=e, taps="us6,us9", chunk_size=3)
    noise = torch.randn(e, 2, 4, 16, 16)
    post = torch.randn(e, 2, 4, 16, 16)
    ensemble = extractor.extract(tiny_images, noise=noise, posterior_noise=post)
    single = NoisyExtractor(tiny_backbone, t=400, ensemble=1, taps="us6,us9")
    draws = [single.extract(tiny_images, noise=noise[k:k + 1], posterior_noise=post[k:k + 1]) for k in range(e)]
    for name in ensemble:
        mean = torch.stack([d[name] for d in draws]).mean(0)
        torch.testing.assert_close(ensemble[name], mean, rtol=1e-4, atol=1e-4)


def test_single_draw_matches_manual_dift(tiny_backbone, tiny_images):
    """x_t = sqrt(abar) x0 + sqrt(1-abar) eps with the model's own schedule, then the frozen U-Net."""
    extractor = NoisyExtractor(tiny_backbone, t=261, ensemble=1, taps="us6", sample_posterior=False)
    eps = torch.randn(1, 2, 4, 16, 16)
    feats = extractor.extract(tiny_images, prompts="x", noise=eps)
    x0 = tiny_backbone.vae.encode(tiny_images).latent_dist.mean * 0.18215
    abar = tiny_backbone.scheduler.alphas_cumprod[261]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps[0]
    cond = tiny_backbone.encode_prompts("x", 2)
    expected = run_to_taps(tiny_backbone.unet, xt, torch.tensor([261, 261]), cond, tiny_backbone.taps.select("us6"))
    torch.testing.assert_close(feats["us6"], expected["us6"], rtol=1e-5, atol=1e-5)


def test_shared_noise_uses_the_same_draws_for_every_image(tiny_backbone):
    extractor = NoisyExtractor(tiny_backbone, ensemble=2, noise="shared")
    noise = extractor.draw_noise(3, (4, 16, 16), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert noise.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(noise[:, 0], noise[:, 2])
    independent = NoisyExtractor(tiny_backbone, ensemble=2).draw_noise(3, (4, 16, 16), torch.Generator().manual_seed(0),
                                                                      torch.device("cpu"))
    assert not torch.allclose(independent[:, 0], independent[:, 1])


def test_identical_images_with_shared_noise_give_identical_features(tiny_backbone, tiny_images):
    images = tiny_images[:1].expand(2, -1, -1, -1)
    feats = NoisyExtractor(tiny_backbone, ensemble=2, noise="shared", taps="us6")(
        images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(feats["us6"][0], feats["us6"][1])


@pytest.mark.parametrize("t", [-1, 1000, 1e6, "261"])
def test_timestep_outside_range_is_refused(tiny_backbone, t):
    with pytest.raises(TimestepError, match=r"\[0, 999\]"):
        NoisyExtractor(tiny_backbone, t=t)
    with pytest.raises(TimestepError):
        CleanExtractor(tiny_backbone, timestep=t)


def test_bad_shapes_are_refused(tiny_backbone):
    extractor = CleanExtractor(tiny_backbone)
    with pytest.raises(ValueError, match="multiple of 64"):
        extractor(torch.zeros(1, 3, 100, 128))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        extractor(torch.zeros(3, 128, 128))
    with pytest.raises(ValueError, match="prompts for a batch"):
        extractor(torch.zeros(2, 3, 128, 128), prompts=["a"])


def test_prompt_encodings_are_cached(tiny_backbone, monkeypatch):
    tiny_backbone.clear_prompt_cache()
    calls = []
    original = tiny_backbone._encode_prompt_batch
    monkeypatch.setattr(tiny_backbone, "_encode_prompt_batch", lambda p: calls.append(list(p)) or original(p))
    tiny_backbone.encode_prompts(["a dog", "a dog", "a cat"], 3)
    tiny_backbone.encode_prompts("a dog", 5)
    assert calls == [["a dog", "a cat"]]


def test_prompt_changes_features(tiny_backbone, tiny_images):
    extractor = CleanExtractor(tiny_backbone, taps="us6")
    assert not torch.allclose(extractor(tiny_images, "a cat")["us6"], extractor(tiny_images, "")["us6"])


def test_vae_posterior_sampling_option(tiny_backbone, tiny_images):
    g = torch.Generator().manual_seed(0)
    mean = tiny_backbone.encode_images(tiny_images)
    sample = tiny_backbone.encode_images(tiny_images, sample_posterior=True, generator=g)
    assert mean.shape == sample.shape == (2, 4, 16, 16)
    assert not torch.allclose(mean, sample)


def test_bf16_extraction_runs_and_is_close(tiny_pipeline_dir, tiny_images):
    from cleandift import load_backbone

    fp32 = load_backbone(str(tiny_pipeline_dir))
    bf16 = load_backbone(str(tiny_pipeline_dir), dtype=torch.bfloat16)
    a = CleanExtractor(fp32, taps="us6")(tiny_images)["us6"]
    b = CleanExtractor(bf16, taps="us6")(tiny_images)["us6"]
    assert b.dtype == torch.float32  # features are always returned as float32
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
    assert cos > 0.99
