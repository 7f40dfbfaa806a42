"""Flags and helpers shared by several subcommands (model loading, device and dtype)."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "sd15") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="preset (sd15, sd21, mini), diffusers folder, hub id or single-file checkpoint "
                            f"(default: {default_model})")
    group.add_argument("--checkpoint", default=None,
                       help="student weights: a released cleandift_*_unet/_full.safetensors, a diffusers U-Net "
                            "folder or a `cleandift train` export")
    group.add_argument("--model-config", dest="single_file_config", default=None,
                       help="diffusers folder / hub id with the configs of a single-file --model (needed offline)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    group.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute precision (default fp32)")


def resolve_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(name: str) -> torch.dtype:
    return DTYPES[name]
