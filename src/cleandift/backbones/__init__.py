"""Diffusion backbones: Stable Diffusion (latent) and the bundled pixel-space model, one interface."""

from .base import DiffusionBackbone
from .loading import load_backbone
from .presets import PRESETS, BackbonePreset
from .stable_diffusion import StableDiffusionBackbone

__all__ = ["DiffusionBackbone", "StableDiffusionBackbone", "load_backbone", "PRESETS", "BackbonePreset"]
