"""cleandift: clean, noise-free semantic features from diffusion U-Nets (CleanDIFT, CVPR 2025).

Quick start::

    import cleandift
    backbone = cleandift.load_backbone("sd21", device="cuda", dtype=torch.bfloat16)
    student, ckpt = cleandift.load_student(backbone.unet, "cleandift-sd21")  # released weights, cached
    feats = cleandift.CleanExtractor(backbone, unet=student)(images, prompts="a photo of a cat")

The public names below are imported on first use (PEP 562), so ``import cleandift`` and the CLI's
``--help`` stay fast: torch and diffusers load only when a model is actually needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .backbones import DiffusionBackbone, StableDiffusionBackbone, load_backbone
    from .checkpoints import load_student, read_checkpoint
    from .distill import FeatureAligner
    from .extract import CleanExtractor, FeatureExtractor, NoisyExtractor
    from .feature_files import load_features
    from .features import l2_normalize, sample_points, upsample
    from .heads import ProjectionHeads, project_features
    from .taps import REFERENCE_TAPS, Tap, TapTable, discover_taps
    from .timesteps import DIFT_TIMESTEP

#: public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "DiffusionBackbone": "backbones", "StableDiffusionBackbone": "backbones", "load_backbone": "backbones",
    "load_student": "checkpoints", "read_checkpoint": "checkpoints",
    "FeatureAligner": "distill",
    "CleanExtractor": "extract", "FeatureExtractor": "extract", "NoisyExtractor": "extract",
    "l2_normalize": "features", "sample_points": "features", "upsample": "features",
    "load_features": "feature_files",
    "ProjectionHeads": "heads", "project_features": "heads",
    "REFERENCE_TAPS": "taps", "Tap": "taps", "TapTable": "taps", "discover_taps": "taps",
    "DIFT_TIMESTEP": "timesteps",
}

__all__ = [
    "DiffusionBackbone", "StableDiffusionBackbone", "load_backbone", "load_student", "read_checkpoint",
    "FeatureAligner", "ProjectionHeads", "project_features", "CleanExtractor", "NoisyExtractor",
    "FeatureExtractor", "l2_normalize", "sample_points", "upsample", "REFERENCE_TAPS", "Tap", "TapTable",
    "discover_taps", "DIFT_TIMESTEP", "load_features", "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
