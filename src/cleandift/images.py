"""Reading images robustly and resizing them for a backbone, with exact coordinate bookkeeping.

Pixel convention (used by every function that takes or returns points): a point ``(x, y)`` is in
pixel-index coordinates of the *original* image, so ``(0, 0)`` is the centre of the top-left pixel
and ``(W-1, H-1)`` the centre of the bottom-right one. A pixel covers ``[x-0.5, x+0.5)``.
:class:`ResizeTransform` maps such points into the resized model frame and back.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImageError, printable

log = logging.getLogger(__name__)

ResizePolicy = Literal["stretch", "pad", "crop"]
RESIZE_POLICIES: tuple[str, ...] = ("stretch", "pad", "crop")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class NonFinitePixelsError(ValueError):
    """A float image with NaN/inf pixels (no scaling makes those meaningful)."""


def load_image(path: str | os.PathLike, min_side: int = 1) -> Image.Image:
    """Open an image file as 8-bit RGB, applying its EXIF orientation.

    Handles grayscale, palette, RGBA / LA (composited onto white: transparent pixels become white,
    not the arbitrary colour stored under alpha 0), CMYK and 16-/32-bit integer or float images
    (rescaled by their value range, see :func:`to_rgb`). Raises :class:`BadImageError` naming the file
    for anything that is not a usable image: missing, empty, truncated, undecodable, a decompression
    bomb, non-finite float pixels, a folder, FIFO, dangling symlink or symlink loop, or an image smaller
    than ``min_side`` pixels. A hostile file never escapes as another exception type.
    """
    path = Path(path)
    kind, reason = entry_kind(path)
    if kind == "missing":
        raise BadImageError(path, "file not found")
    if kind == "dir":
        raise BadImageError(path, "is a folder, not an image")
    if kind == "bad":
        raise BadImageError(path, reason)
    if path.stat().st_size == 0:
        raise BadImageError(path, "file is empty (0 bytes)", "re-download or remove it")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"refused as a decompression bomb ({exc})",
                            "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(path, "not a readable image format", "convert it to PNG or JPEG") from exc
    except NonFinitePixelsError as exc:
        raise BadImageError(path, str(exc), "fix or remove the file") from exc
    except PermissionError as exc:
        raise BadImageError(path, "cannot be read (permission denied)", "check its permissions") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"corrupt or truncated image ({printable(exc)})", "re-download or remove it") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile input; name the file instead
        raise BadImageError(path, f"could not be decoded ({type(exc).__name__}: {printable(exc)})",
                            "re-download or remove it") from exc
    if min(rgb.size) < min_side:
        raise BadImageError(path, f"image is {rgb.width}x{rgb.height} px, smaller than one model cell ({min_side} px)",
                            "use a larger image")
    return rgb


_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high-bit-depth data.

    16-bit images are scaled by 65535; 32-bit integer and float images by the range their values fit
    (``[0, 1]`` for floats, ``[0, 255]``, ``[0, 65535]``, else their own min..max). Float images with
    NaN/inf pixels raise :class:`NonFinitePixelsError`.
    """
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = _value_range(img.mode, arr)
        arr = np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
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


def _value_range(mode: str, arr: np.ndarray) -> tuple[float, float]:
    """``(lo, hi)`` that map to black and white for a high-bit-depth image."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    finite = np.isfinite(arr)
    if not finite.all():
        raise NonFinitePixelsError(f"{int((~finite).sum())} of {arr.size} pixel values are NaN or inf")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    ranges = ((0.0, 1.0), (0.0, 255.0), (0.0, 65535.0)) if mode == "F" else ((0.0, 255.0), (0.0, 65535.0))
    for r_lo, r_hi in ranges:
        if lo >= r_lo and hi <= r_hi:
            return r_lo, r_hi
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


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


@dataclass
class ImageScan:
    """What :func:`scan_images` found: image files with their keys, and what it skipped (by name, why)."""

    paths: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (printable path, reason)


def scan_images(inputs: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = True) -> ImageScan:
    """Expand files, folders (recursively) and glob patterns into image files with stable keys.

    Folder entries with an image suffix that cannot be images -- FIFOs, sockets, dangling symlinks,
    symlink loops, folders named ``x.jpg`` -- and folder symlinks leading back into their own tree are
    reported in ``skipped`` instead of vanishing (a folder named like an image is still searched). A
    missing file argument is kept: reading it reports "file not found" by name.

    Keys (:func:`path_keys`) are paths relative to the common base of the arguments (a folder argument's
    base is the folder, a file's its parent), computed without resolving symlinks: a link pointing
    elsewhere never changes the other keys, and an alias keeps its own name.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    scan = ImageScan()
    found: list[tuple[Path, Path]] = []  # (path, base folder)
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        kind, reason = entry_kind(path)
        if kind == "dir":
            files: list[Path] = []
            _walk(path, recursive, files, scan.skipped, frozenset({os.path.realpath(path)}))
            found.extend((p, path) for p in files)
        elif kind == "missing" and any(ch in text for ch in "*?["):
            base = _glob_base(path)
            for match in sorted(base.glob(path.relative_to(base).as_posix())):
                _add_glob_match(match, base, found, scan.skipped)
        elif kind == "bad":
            scan.skipped.append((printable(path), reason))
        else:  # a file, or a missing one (reported by name when read)
            found.append((path, path.parent))
    unique: dict[str, tuple[Path, Path]] = {}
    for path, base in found:
        unique.setdefault(os.path.abspath(path), (path, base))
    scan.paths = [p for p, _ in unique.values()]
    scan.keys = path_keys(scan.paths, [b for _, b in unique.values()])
    return scan


def find_images(inputs: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """The image files of :func:`scan_images` (skipped entries are logged as warnings)."""
    scan = scan_images(inputs, recursive)
    for path, reason in scan.skipped:
        log.warning("skipping %s: %s", path, reason)
    return scan.paths


def path_keys(paths: Sequence[str | os.PathLike], bases: Sequence[str | os.PathLike] | None = None) -> list[str]:
    """Unique, valid-UTF-8 keys for image files: paths relative to the common folder of ``bases``.

    ``bases`` default to each path's parent. Purely lexical (``abspath``, never ``resolve``), so symlinks
    do not move keys; undecodable name bytes are escaped (:func:`cleandift.errors.printable`).
    """
    if not paths:
        return []
    absolute = [os.path.abspath(p) for p in paths]
    base_dirs = [os.path.abspath(b) for b in bases] if bases is not None else [os.path.dirname(a) for a in absolute]
    common = os.path.commonpath(base_dirs)
    keys: list[str] = []
    seen: set[str] = set()
    for a in absolute:
        key = printable(Path(os.path.relpath(a, common)).as_posix())
        candidate, n = key, 1
        while candidate in seen:  # only escaping can collide (a name that spells out "\\xNN" itself)
            n += 1
            candidate = f"{key}~{n}"
        seen.add(candidate)
        keys.append(candidate)
    return keys


def entry_kind(path: str | os.PathLike) -> tuple[str, str]:
    """``("file" | "dir" | "missing" | "bad", reason)`` of a path, without opening it.

    ``bad`` covers what must never be opened as an image: FIFOs (opening one blocks), sockets,
    devices, dangling symlinks and symlink loops.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "bad", "symlink loop (the link leads back to itself)"
        if os.path.islink(path):
            try:
                target = printable(os.readlink(path))
            except OSError:
                target = "?"
            return "bad", f"dangling symlink (its target {target} does not exist)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing", "file not found"
        return "bad", f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "dir", ""
    if stat.S_ISREG(st.st_mode):
        return "file", ""
    return "bad", f"not a regular file ({_special_kind(st.st_mode)}), not an image"


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk(folder: Path, recursive: bool, files: list[Path], skipped: list[tuple[str, str]],
          ancestors: frozenset[str]) -> None:
    """Depth-first, name-sorted listing of ``folder`` (the order ``sorted(glob("**/*"))`` gives)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        skipped.append((printable(folder), f"folder cannot be listed ({exc.strerror})"))
        return
    for name in names:
        path = folder / name
        imagey = _is_image_name(name)
        kind, reason = entry_kind(path)
        if kind == "file":
            if imagey:
                files.append(path)
        elif kind == "dir":
            if imagey:
                skipped.append((printable(path), "is a folder named like an image, not an image"
                                + (" (its contents are searched)" if recursive else "")))
            if not recursive:
                continue
            real = os.path.realpath(path)
            if real in ancestors:
                skipped.append((printable(path), f"symlink loop (leads back to {printable(real)}); not searched"))
            else:
                _walk(path, recursive, files, skipped, ancestors | {real})
        elif imagey or not Path(name).suffix:  # suffix-less entries could have been folders
            skipped.append((printable(path), reason))


def _glob_base(pattern: Path) -> Path:
    """The folder part of a glob pattern before its first wildcard (``imgs/*/x.png`` -> ``imgs``)."""
    parts = []
    for part in pattern.parts:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _add_glob_match(match: Path, base: Path, found: list[tuple[Path, Path]], skipped: list[tuple[str, str]]) -> None:
    kind, reason = entry_kind(match)
    if kind == "file":
        found.append((match, base))
    elif kind == "dir":
        if _is_image_name(match.name):
            skipped.append((printable(match), "is a folder named like an image, not an image"))
    elif kind == "bad":
        skipped.append((printable(match), reason))
