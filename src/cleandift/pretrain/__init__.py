"""Pretraining of the bundled pixel-space ``mini`` diffusion model (``cleandift pretrain-mini``).

``idx`` reads Fashion-MNIST, ``train`` trains with exact resume, ``sampling`` draws class-conditional
samples, ``export`` writes the shippable fp16 folder + model card, ``probe`` measures kNN quality.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule; imported on first use (PEP 562) so ``pretrain.config`` stays torch-free
_LAZY = {"load_idx_dataset": "idx", "read_idx": "idx", "to_model_range": "idx", "write_idx": "idx",
         "image_grid": "sampling", "sample_images": "sampling", "PretrainConfig": "config",
         "Pretrainer": "train", "RunSnapshot": "train", "load_checkpoint_backbone": "train", "open_run": "train",
         "read_run": "train"}

__all__ = ["load_idx_dataset", "read_idx", "write_idx", "to_model_range", "PretrainConfig", "Pretrainer",
           "RunSnapshot", "open_run", "read_run", "load_checkpoint_backbone", "sample_images", "image_grid"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
