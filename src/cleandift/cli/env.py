"""``cleandift env``: versions, devices, and which backbones can be loaded right now (paste into bug reports)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("env", help="print versions, devices and which backbones are loadable offline")
    p.set_defaults(func=run)
    return p


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def cached_sources(source: str) -> bool:
    """Whether a hub repo's U-Net config is already in the local HF cache (no network used)."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    try:
        found = try_to_load_from_cache(source, "unet/config.json")
    except Exception:  # noqa: BLE001 - malformed ids etc.
        return False
    return isinstance(found, str)


def backbone_status() -> list[tuple[str, str, str]]:
    from ..backbones.presets import PRESETS  # noqa: PLC0415

    rows = []
    for name, preset in PRESETS.items():
        if name == "mini":
            from ..backbones import pixel  # noqa: PLC0415

            ok = pixel.bundled_mini_available() if hasattr(pixel, "bundled_mini_available") else False
            rows.append((name, "bundled with the package", "yes" if ok else "no (weights not shipped in this build)"))
            continue
        cached = [s for s in preset.sources if cached_sources(s)]
        rows.append((name, ", ".join(preset.sources), f"yes ({cached[0]})" if cached else "no (needs network)"))
    return rows


def run(args) -> int:
    import torch  # noqa: PLC0415

    from ..version import __version__  # noqa: PLC0415

    print(f"cleandift       {__version__}")
    print(f"python          {platform.python_version()} ({platform.platform()})")
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "numpy",
                "pillow", "matplotlib"):
        print(f"{pkg:<15} {_version(pkg)}")
    print(f"cpu threads     {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}         {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 "
                  f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        print("cuda            not available")
    mps = getattr(torch.backends, "mps", None)
    print(f"mps             {'available' if mps is not None and mps.is_available() else 'not available'}")
    print("backbones (loadable offline?):")
    for name, sources, status in backbone_status():
        print(f"  {name:<6} {status:<40} {sources}")
    return 0
