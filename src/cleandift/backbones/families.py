"""The registry of backbone families: which cleandift module loads which diffusers pipeline.

A family is one module in this package (its prompt conditioning, tap table and noise process), the
way diffusers has one pipeline per family. A diffusers folder or hub repo names its pipeline class in
``model_index.json``; :func:`family_for` maps that name to the module whose ``load(source, ...)``
builds the backbone. Adding a family = one module with a ``load`` function + one entry here.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Family:
    """A backbone family: its name, the diffusers pipeline classes it serves, and the module that loads it."""

    name: str
    pipelines: tuple[str, ...]
    module: str
    description: str

    def loader(self) -> Callable:
        return importlib.import_module(self.module).load


FAMILIES: tuple[Family, ...] = (
    Family("stable-diffusion", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
           "cleandift.backbones.stable_diffusion", "SD 1.x / 2.x: CLIP + U-Net, DDPM"),
    Family("sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
           "cleandift.backbones.sdxl", "SDXL (+ Turbo): two CLIPs + U-Net with added time ids, DDPM"),
    Family("sd3", ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
           "cleandift.backbones.sd3", "SD3 / 3.5: CLIP-L + CLIP-G + T5 + MMDiT, rectified flow (static shift)"),
    Family("pixart", ("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
           "cleandift.backbones.pixart", "PixArt-Sigma / -Alpha: T5 + DiT, DDPM"),
    Family("flux", ("FluxPipeline", "FluxImg2ImgPipeline"),
           "cleandift.backbones.flux", "Flux.1: CLIP + T5 + MMDiT, rectified flow (dynamic shift)"),
)


def family_for(pipeline_class: str | None) -> Family | None:
    """The family serving a diffusers pipeline class name (``None`` when no family does)."""
    for family in FAMILIES:
        if pipeline_class in family.pipelines:
            return family
    return None


def get_family(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"unknown backbone family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def pipeline_class_of(source: str, local_files_only: bool) -> str | None:
    """``_class_name`` in a diffusers folder's or hub repo's ``model_index.json`` (``None`` if it has none)."""
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{index}: not readable JSON ({exc})") from exc
    from diffusers import DiffusionPipeline  # noqa: PLC0415

    return DiffusionPipeline.load_config(source, local_files_only=local_files_only).get("_class_name")
