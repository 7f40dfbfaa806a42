"""Pretraining of the bundled pixel-space ``mini`` diffusion model (``cleandift pretrain-mini``)."""

from .idx import load_idx_dataset, read_idx, to_model_range, write_idx
from .train import PretrainConfig, Pretrainer, load_checkpoint_backbone, open_run

__all__ = ["load_idx_dataset", "read_idx", "write_idx", "to_model_range", "PretrainConfig", "Pretrainer",
           "open_run", "load_checkpoint_backbone"]
