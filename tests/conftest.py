"""Shared fixtures: tiny Stable-Diffusion-structured models written to disk and loaded back.

The tiny models keep SD's block layout (3 cross-attention down blocks + plain, cross-attention mid,
plain up + 3 cross-attention up blocks, 2 layers per block) so every one of the 11 reference taps
exists at its real relative stride. They are saved with ``save_pretrained`` and loaded through
:func:`cleandift.load_backbone` -- the loading path users take. Nothing touches the network.

Session-scoped backbones are shared: tests must not modify their weights (copy them first).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The tiny test models are dispatch-bound: extra intra-op threads only add contention (up to 10x slower
# on a loaded 2-core machine) and make float reductions depend on the thread count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _pipeline_dir(tmp_path_factory, arch: str):
    from cleandift.backbones.random_init import build_random_backbone, save_pipeline_folder

    folder = tmp_path_factory.mktemp(arch)
    backbone = build_random_backbone(arch, seed=0, tokenizer_dir=folder / "_tok")
    return save_pipeline_folder(backbone, folder / "pipeline")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A diffusers SD pipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) of a tiny SD1.5-like model."""
    return _pipeline_dir(tmp_path_factory, "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sd21_pipeline_dir(tmp_path_factory):
    """Same for an SD2.1-like model (linear proj_in/out, per-block head dims, other text width)."""
    return _pipeline_dir(tmp_path_factory, "tiny-sd21")


@pytest.fixture(scope="session")
def tiny_backbone(tiny_pipeline_dir):
    from cleandift import load_backbone

    return load_backbone(str(tiny_pipeline_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_sd21_backbone(tiny_sd21_pipeline_dir):
    from cleandift import load_backbone

    return load_backbone(str(tiny_sd21_pipeline_dir), device="cpu")


@pytest.fixture
def tiny_images():
    """Two deterministic 128x128 images in [-1, 1] (the tiny model's native size)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 128, 128, generator=g) * 2 - 1
