"""Pretraining of the bundled pixel-space ``mini`` diffusion model (``cleandift pretrain-mini``).

``idx`` reads Fashion-MNIST, ``train`` trains with exact resume, ``sampling`` draws class-conditional
samples, ``export`` writes the shippable fp16 folder + model card, ``probe`` measures kNN quality.
"""

from .idx import load_idx_dataset, read_idx, to_model_range, write_idx
from .sampling import image_grid, sample_images
from .train import PretrainConfig, Pretrainer, RunSnapshot, load_checkpoint_backbone, open_run, read_run

__all__ = ["load_idx_dataset", "read_idx", "write_idx", "to_model_range", "PretrainConfig", "Pretrainer",
           "RunSnapshot", "open_run", "read_run", "load_checkpoint_backbone", "sample_images", "image_grid"]
