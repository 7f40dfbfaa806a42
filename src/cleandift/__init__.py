"""cleandift: clean, noise-free semantic features from diffusion U-Nets (CleanDIFT, CVPR 2025).

Quick start::

    import cleandift
    backbone = cleandift.load_backbone("sd21", device="cuda", dtype=torch.bfloat16)
    student, ckpt = cleandift.load_student(backbone.unet, "cleandift_sd21_unet.safetensors")
    feats = cleandift.CleanExtractor(backbone, unet=student)(images, prompts="a photo of a cat")
"""

from .backbones import DiffusionBackbone, StableDiffusionBackbone, load_backbone
from .checkpoints import load_student, read_checkpoint
from .distill import FeatureAligner
from .extract import CleanExtractor, FeatureExtractor, NoisyExtractor
from .features import l2_normalize, sample_points, upsample
from .heads import ProjectionHeads, project_features
from .taps import REFERENCE_TAPS, Tap, TapTable, discover_taps
from .timesteps import DIFT_TIMESTEP
from .version import __version__

__all__ = [
    "DiffusionBackbone", "StableDiffusionBackbone", "load_backbone", "load_student", "read_checkpoint",
    "FeatureAligner", "ProjectionHeads", "project_features", "CleanExtractor", "NoisyExtractor",
    "FeatureExtractor", "l2_normalize", "sample_points", "upsample", "REFERENCE_TAPS", "Tap", "TapTable",
    "discover_taps", "DIFT_TIMESTEP", "__version__",
]
