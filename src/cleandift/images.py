"""Reading images robustly and resizing them for a backbone, with exact coordinate bookkeeping.

Pixel convention (used by every function that takes or returns points): a point ``(x, y)`` is in
pixel-index coordinates of the *original* image, so ``(0, 0)`` is the centre of the top-left pixel
and ``(W-1, H-1)`` the centre of the bottom-right one. A pixel covers ``[x-0.5, x+0.5)``.
:class:`ResizeTransform` maps such points into the resized model frame and back.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImageError

ResizePolicy = Literal["stretch", "pad", "crop"]
RESIZE_POLICIES: tuple[str, ...] = ("stretch", "pad", "crop")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def load_image(path: str | os.PathLike, min_side: int = 1) -> Image.Image:
    """Open an image file as 8-bit RGB, applying its EXIF orientation.

    Handles grayscale, palette, RGBA / LA (composited onto white: transparent pixels become white,
    not the arbitrary colour stored under alpha 0), CMYK and 16-/32-bit integer or float images
    (rescaled by their full range, not clipped). Raises :class:`BadImageError` naming the file for
    missing, empty, truncated or unreadable files and for images smaller than ``min_side`` pixels.
    """
    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file not found")
    if path.is_dir():
        raise BadImageError(path, "is a folder, not an image")
    if path.stat().st_size == 0:
        raise BadImageError(path, "file is empty (0 bytes)", "re-download or remove it")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
    except UnidentifiedImageError as exc:
        raise BadImageError(path, "not a readable image format", "convert it to PNG or JPEG") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"corrupt or truncated image ({exc})", "re-download or remove it") from exc
    if min(rgb.size) < min_side:
        raise BadImageError(path, f"image is {rgb.width}x{rgb.height} px, smaller than one model cell ({min_side} px)",
                            "use a larger image")
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high-bit-depth data."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode in ("I", "F") and arr.max() <= 255 and arr.min() >= 0:
            hi = 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


@dataclass(frozen=True)
class ResizeTransform:
    """How an original image of ``(orig_w, orig_h)`` was placed in the ``(out_w, out_h)`` frame.

    A point maps as ``x_out = (x + 0.5) * scale_x - 0.5 + offset_x`` (same for y), which keeps
    pixel centres aligned under scaling.
    """

    orig_w: int
    orig_h: int
    out_w: int
    out_h: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    policy: str

    def to_model(self, xy: torch.Tensor | np.ndarray) -> torch.Tensor:
        xy = torch.as_tensor(xy, dtype=torch.float32)
        scale = xy.new_tensor([self.scale_x, self.scale_y])
        offset = xy.new_tensor([self.offset_x, self.offset_y])
        return (xy + 0.5) * scale - 0.5 + offset

    def to_original(self, xy: torch.Tensor | np.ndarray) -> torch.Tensor:
        xy = torch.as_tensor(xy, dtype=torch.float32)
        scale = xy.new_tensor([self.scale_x, self.scale_y])
        offset = xy.new_tensor([self.offset_x, self.offset_y])
        return (xy - offset + 0.5) / scale - 0.5

    def valid_region(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of the model frame covered by image content (excludes padding)."""
        x0 = max(self.offset_x, 0.0)
        y0 = max(self.offset_y, 0.0)
        x1 = min(self.offset_x + self.orig_w * self.scale_x, float(self.out_w))
        y1 = min(self.offset_y + self.orig_h * self.scale_y, float(self.out_h))
        return x0, y0, x1, y1

    def as_dict(self) -> dict:
        return asdict(self)


def resize_image(img: Image.Image, size: int | tuple[int, int], policy: ResizePolicy = "stretch",
                 resample: int = Image.BICUBIC) -> tuple[Image.Image, ResizeTransform]:
    """Resize to the model frame with a named policy.

    * ``stretch`` -- to exactly ``size`` x ``size``, aspect distorted (DIFT, the reference code).
    * ``pad`` -- longer side to ``size`` keeping the aspect, centred on black padding (SD-DINO).
    * ``crop`` -- shorter side to ``size``, then a centre crop (the paper's training crop).
    """
    out_w, out_h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    w, h = img.size
    if policy == "stretch":
        out = img.resize((out_w, out_h), resample)
        return out, ResizeTransform(w, h, out_w, out_h, out_w / w, out_h / h, 0.0, 0.0, policy)
    if policy == "pad":
        s = min(out_w / w, out_h / h)
        new_w, new_h = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("RGB", (out_w, out_h), (0, 0, 0))
        ox, oy = (out_w - new_w) // 2, (out_h - new_h) // 2
        canvas.paste(img.resize((new_w, new_h), resample), (ox, oy))
        return canvas, ResizeTransform(w, h, out_w, out_h, new_w / w, new_h / h, float(ox), float(oy), policy)
    if policy == "crop":
        s = max(out_w / w, out_h / h)
        new_w, new_h = max(out_w, round(w * s)), max(out_h, round(h * s))
        resized = img.resize((new_w, new_h), resample)
        left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
        out = resized.crop((left, top, left + out_w, top + out_h))
        return out, ResizeTransform(w, h, out_w, out_h, new_w / w, new_h / h, float(-left), float(-top), policy)
    raise ValueError(f"unknown resize policy {policy!r}; choose from {', '.join(RESIZE_POLICIES)}")


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor ``(3, H, W)`` in ``[-1, 1]`` (what every backbone expects)."""
    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Inverse of :func:`image_to_tensor` (for figures)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def prepare_images(images: Sequence[Image.Image], size: int, policy: ResizePolicy = "stretch"
                   ) -> tuple[torch.Tensor, list[ResizeTransform]]:
    """Resize a list of RGB images to one batch ``(B, 3, size, size)`` in ``[-1, 1]``."""
    tensors, transforms = [], []
    for img in images:
        out, tf = resize_image(img, size, policy)
        tensors.append(image_to_tensor(out))
        transforms.append(tf)
    return torch.stack(tensors), transforms


def find_images(inputs: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted, de-duplicated file list."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(p for p in sorted(path.glob(pattern)) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in text for ch in "*?["):
            base = Path(text).anchor or "."
            rel = text[len(base):] if Path(text).is_absolute() else text
            found.extend(p for p in sorted(Path(base).glob(rel)) if p.is_file())
        else:
            found.append(path)  # a missing file is reported when it is read, with its name
    return list(dict.fromkeys(found))
