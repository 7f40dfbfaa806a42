"""Folders of random training images, written the same way by every training test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_random_images(folder: Path, n: int = 5, seed: int = 0, height: int = 72, width: int = 96,
                        grow: int = 0) -> Path:
    """``n`` random RGB PNGs ``img{i}.png`` of ``(height + grow * i) x width`` pixels; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 255, (height + grow * i, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder
