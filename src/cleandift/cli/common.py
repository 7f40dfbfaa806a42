"""Flags and helpers shared by several subcommands (model loading, device and dtype)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ..constants import DTYPE_NAMES
from ..released import RELEASED

if TYPE_CHECKING:
    import torch


class _TorchDtypes(Mapping):
    """``--dtype`` name -> ``torch.dtype``; the names are known without importing torch (fast ``--help``)."""

    def __getitem__(self, name: str) -> torch.dtype:
        import torch  # noqa: PLC0415

        return getattr(torch, DTYPE_NAMES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(DTYPE_NAMES)

    def __len__(self) -> int:
        return len(DTYPE_NAMES)


DTYPES: Mapping[str, torch.dtype] = _TorchDtypes()


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "sd15") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="preset (sd15, sd21, mini), diffusers folder, hub id or single-file checkpoint "
                            f"(default: {default_model})")
    group.add_argument("--checkpoint", default=None,
                       help=f"student weights: a released student by name ({', '.join(RELEASED)}; downloaded once "
                            "from the hub repo CompVis/cleandift into the HF cache), a cleandift_*_unet/_full"
                            ".safetensors file, a diffusers U-Net folder or a `cleandift train` export")
    group.add_argument("--model-config", dest="single_file_config", default=None,
                       help="diffusers folder / hub id with the configs of a single-file --model (needed offline)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    group.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute precision (default fp32)")


def resolve_device(name: str | None) -> torch.device:
    import torch  # noqa: PLC0415

    if name:
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def check_device(name: str) -> torch.device:
    """``torch.device(name)``, refusing (one line, before any model loads) a device this torch cannot use."""
    import torch  # noqa: PLC0415

    from ..errors import ConfigError  # noqa: PLC0415

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--device {name}: not a device name; use cpu, cuda, cuda:1 or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {name}: CUDA is not available ({build}); use --device cpu, or install "
                              "a CUDA build of torch (https://pytorch.org/get-started/locally/)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device
