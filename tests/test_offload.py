"""Model CPU offload (diffusers' hooks) for the pipeline families: same features, models moved only to run.

No GPU here: the execution device is the CPU, which checks the plumbing (hooks installed, inputs and
outputs routed through them, early stop inside an offloaded forward); on a GPU the same calls move each
model to it while it runs.
"""

from __future__ import annotations

import pytest
import torch

from cleandift import CleanExtractor, NoisyExtractor, load_backbone
from cleandift.errors import ConfigError
from cleandift.testing import tiny_flux


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tiny_flux.save(tmp_path_factory.mktemp("flux"))


def test_offloaded_backbone_gives_the_same_features(flux_dir):
    plain = load_backbone(str(flux_dir))
    offloaded = load_backbone(str(flux_dir), device="cpu", offload=True)
    assert hasattr(offloaded.denoiser, "_hf_hook") and hasattr(offloaded.vae, "_hf_hook")
    assert offloaded.offload_device == torch.device("cpu")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for make in (lambda b: CleanExtractor(b, taps="all"), lambda b: NoisyExtractor(b, ensemble=2, taps="block1")):
        ours = make(offloaded)(images, prompts="a cat", generator=torch.Generator().manual_seed(1))
        ref = make(plain)(images, prompts="a cat", generator=torch.Generator().manual_seed(1))
        for name in ref:
            torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6)


def test_offload_is_refused_where_everything_fits(tiny_pipeline_dir):
    with pytest.raises(ConfigError, match="model CPU offload needs a diffusers pipeline family"):
        load_backbone(str(tiny_pipeline_dir), offload=True)
