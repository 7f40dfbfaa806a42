"""``cleandift demo``: the built-in default job, fully offline.

When the bundled pixel-space model (``mini``) is shipped -- or ``--model`` names a pixel model folder --
the demo runs on it (:mod:`cleandift.mini_demo`). Otherwise it runs the extraction pipeline on a tiny
Stable-Diffusion-architecture model with *random* weights: this shows that loading, clean and noisy
extraction, early exit and figures work end to end, and how the costs compare, but its features carry
no meaning.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def sample_images(n: int = 4, size: int = 128, seed: int = 0) -> list[Image.Image]:
    """Deterministic synthetic images (a coloured shape on a textured background)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        bg = (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)
        img = Image.fromarray(bg)
        draw = ImageDraw.Draw(img)
        x0, y0 = rng.integers(10, size // 3, 2)
        x1, y1 = x0 + rng.integers(size // 3, size // 2), y0 + rng.integers(size // 3, size // 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if i % 2 else draw.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=colour)
        images.append(img)
    return images


def run_random_demo(out_dir: Path, seed: int = 0) -> Path:
    from .backbones.random_init import build_random_backbone  # noqa: PLC0415
    from .extract import CleanExtractor, NoisyExtractor  # noqa: PLC0415
    from .images import prepare_images  # noqa: PLC0415
    from .viz.pca import save_pca_png  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    print("NOTE: the bundled trained model is not available in this build; running the pipeline on a tiny\n"
          "      SD-architecture model with RANDOM weights (a plumbing check: its features mean nothing).")
    backbone = build_random_backbone("tiny-sd15", seed=seed)
    images = sample_images()
    batch, _ = prepare_images(images, backbone.resolution, "stretch")
    for i, img in enumerate(images):
        img.save(out_dir / f"image{i}.png")
    rows = []
    for name, extractor in (("clean (1 pass)", CleanExtractor(backbone, taps="us6,us9")),
                            ("noisy DIFT t=261, 1 draw", NoisyExtractor(backbone, ensemble=1, taps="us6,us9")),
                            ("noisy DIFT t=261, 8 draws", NoisyExtractor(backbone, ensemble=8, taps="us6,us9"))):
        extractor(batch[:1], "a photo")  # warm-up
        t0 = time.perf_counter()
        feats = extractor(batch, "a photo", generator=torch.Generator().manual_seed(seed))
        rows.append((name, time.perf_counter() - t0))
        if name.startswith("clean"):
            for i in range(len(images)):
                save_pca_png(feats["us9"][i], out_dir / f"image{i}_pca_us9.png", size=images[i].size)
    print(f"\n{'extraction of 4 images':<30} {'seconds':>8}")
    for name, secs in rows:
        print(f"{name:<30} {secs:8.2f}")
    print(f"\nwrote sample images and PCA-RGB feature maps to {out_dir.resolve()}")
    return out_dir


def run_demo(out_dir: str | Path = "cleandift-demo", seed: int = 0, model: str | None = None,
             student: str | None = None, distill_steps: int = 40, bank: int = 1000, queries: int = 300) -> Path:
    """Run the best demo available and return its output folder.

    With a pixel-space model (``model``: an exported ``pretrain-mini`` folder, or the bundled ``mini``
    when this install ships it) the full demo runs (:mod:`cleandift.mini_demo`); otherwise the plumbing
    demo on a random tiny SD-architecture model.
    """
    from .backbones.pixel import bundled_mini_available  # noqa: PLC0415

    out_dir = Path(out_dir)
    if model is not None or bundled_mini_available():
        from .mini_demo import run_mini_demo  # noqa: PLC0415

        return run_mini_demo(out_dir, seed=seed, model=model, student=student, distill_steps=distill_steps,
                             bank=bank, queries=queries)
    return run_random_demo(out_dir, seed=seed)
