"""CleanDIFT distillation training: config, data, loop, export and a memory estimate.

>>> from cleandift.train import TrainConfig, train        # doctest: +SKIP
>>> train(TrainConfig(model="sd15", data="images/", out="runs/x"))  # doctest: +SKIP
"""

from .config import PRESETS, TrainConfig, resolve_config
from .loop import TrainResult, train

__all__ = ["TrainConfig", "resolve_config", "PRESETS", "train", "TrainResult"]
