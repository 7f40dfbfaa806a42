"""``cleandift env``: versions, devices, and which backbones can be loaded right now (paste into bug reports)."""

from __future__ import annotations

import argparse
import platform


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("env", help="print versions, devices and which backbones are loadable offline")
    p.set_defaults(func=run)
    return p


def _version(name: str) -> str:
    import importlib.metadata as md  # noqa: PLC0415 - ~40 ms; only `env` needs it

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def cached_sources(source: str) -> bool:
    """Whether a hub repo's U-Net config is already in the local HF cache (no network used)."""
    from ..hub import in_hub_cache  # noqa: PLC0415

    return in_hub_cache(source, "unet/config.json") is not None


def hub_status() -> str:
    """One line: can models be downloaded right now (a bounded check, about a second at most)?"""
    from ..hub import hub_cache_dir, hub_endpoint, hub_unreachable_reason  # noqa: PLC0415

    reason = hub_unreachable_reason()
    state = "yes" if reason is None else f"no ({reason})"
    return f"{hub_endpoint()} reachable: {state}; cache {hub_cache_dir()}"


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
    print(f"hub             {hub_status()}")
    print("backbones (loadable offline?):")
    for name, sources, status in backbone_status():
        print(f"  {name:<6} {status:<40} {sources}")
    return 0
