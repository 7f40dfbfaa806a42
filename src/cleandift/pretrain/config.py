"""Settings of a ``pretrain-mini`` run: a plain dataclass, importable without torch or diffusers.

Kept apart from :mod:`cleandift.pretrain.train` so that building the CLI parser (which shows these
defaults in ``--help``) stays fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..constants import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from ..errors import ConfigError

#: Where Debian's ``dataset-fashion-mnist`` package installs the idx files.
DEFAULT_DATA_DIR = Path(FASHION_MNIST_DIR)


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (stored in every checkpoint)."""

    data: str = str(DEFAULT_DATA_DIR)
    out: str = "runs/mini-pretrain"
    steps: int = 12000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    seed: int = 0
    resolution: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 64, 96)
    cross_attention_dim: int = 64
    attention_heads: int = 2
    norm_num_groups: int = 8
    bf16: bool = False
    channels_last: bool = True
    threads: int = 1
    checkpoint_every: int = 200
    snapshot_every: int = 2000
    log_every: int = 50
    progress: bool = True
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES
    #: Checkpoint (or run folder) of another run whose state (weights, EMA, optimizer, step, RNG) this
    #: run continues under its own recipe (label dropout, steps, lr, ...); ``None`` starts from scratch.
    init_from: str | None = None

    def unet_config(self) -> dict:
        from ..backbones.pixel import mini_unet_config  # noqa: PLC0415

        return mini_unet_config(self.block_out_channels, cross_attention_dim=self.cross_attention_dim,
                                attention_head_dim=self.attention_heads, image_channels=1,
                                resolution=self.resolution, norm_num_groups=self.norm_num_groups)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"pretraining settings must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown pretraining setting(s) {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("block_out_channels", "class_names"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)
