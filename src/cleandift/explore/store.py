"""The images a session serves: files from the folders given on the command line, plus uploads.

Clients address images only by the integer ids of :meth:`ImageStore.list` -- never by a path -- so
nothing outside the served files can be read however a request is crafted. Every image is checked
the way the rest of cleandift checks images (:func:`cleandift.images.load_image`: truncation, bombs,
odd modes, EXIF orientation), and its pixel count is checked from the header before any decoding.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from ..errors import BadImageError, printable
from ..images import load_image, scan_images
from .limits import ExploreRequestError, Limits, UnknownImageError, UploadTooLargeError

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  #: EXIF orientations that swap width and height
_DECODED_KEPT = 16  #: decoded images kept in memory (serving and feature extraction reuse them)


@dataclass(frozen=True)
class ImageEntry:
    """One servable image: ``width`` / ``height`` are those of the upright (EXIF-applied) image."""

    id: int
    name: str
    path: Path
    width: int
    height: int
    origin: str  #: "folder", "upload" or "sample"

    def info(self) -> dict:
        """What the client may know (never the server-side path)."""
        return {"id": self.id, "name": self.name, "width": self.width, "height": self.height,
                "origin": self.origin}


def header_size(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of the upright image from its header alone (nothing is decoded).

    Over ``max_pixels`` the stored size is returned as it is (the caller refuses it anyway) without
    looking for an EXIF orientation.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller checks the size itself
        with Image.open(path) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                return width, height
            orientation = _orientation(img)
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, read without decoding pixels (PIL's ``getexif`` decodes a whole PNG first)."""
    if img.format in ("JPEG", "MPO", "TIFF", "WEBP"):
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    raw = img.info.get("exif")  # PNG: an eXIf chunk before the image data
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(_EXIF_ORIENTATION, 1))


def safe_name(filename: str | None, fallback: str = "upload") -> str:
    """A display name from a client's file name: the last path component, printable, at most 80 chars."""
    name = re.split(r"[\\/]", str(filename or ""))[-1]
    name = "".join(ch for ch in printable(name) if ch.isprintable()).strip()
    return name[:80] if name and name not in (".", "..") else fallback


class ImageStore:
    """The session's images: listed folder files and uploads (kept in a temporary folder of its own)."""

    def __init__(self, limits: Limits | None = None, min_side: int = 1) -> None:
        self.limits = limits or Limits()
        self.min_side = min_side
        self.skipped: list[tuple[str, str]] = []  #: (name, reason) of files that could not be listed
        self._entries: dict[int, ImageEntry] = {}
        self._decoded: OrderedDict[int, Image.Image] = OrderedDict()
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="cleandift-explore-")
        self.upload_dir = Path(self._tmp.name)
        self._uploads = 0

    # ------------------------------------------------------------------ adding
    def add_paths(self, inputs: Iterable[str | os.PathLike], origin: str = "folder") -> list[ImageEntry]:
        """List image files, folders (recursively) and globs; unusable files go to :attr:`skipped`."""
        scan = scan_images(list(inputs))
        self.skipped.extend(scan.skipped)
        added = []
        for path, key in zip(scan.paths, scan.keys, strict=True):
            if len(self._entries) >= self.limits.max_images:
                self.skipped.append((key, f"more than {self.limits.max_images} images; not listed"))
                continue
            try:
                width, height = self._checked_header(path, key)
            except ExploreRequestError as exc:
                self.skipped.append((key, str(exc)))
                continue
            added.append(self._add(key, path, width, height, origin))
        return added

    def add_upload(self, data: bytes, filename: str | None) -> ImageEntry:
        """Store an uploaded file after the size, pixel and decode checks; refusals name the upload."""
        name = safe_name(filename)
        if not data:
            raise ExploreRequestError(f"{name}: the file is empty (0 bytes); choose an image file")
        if len(data) > self.limits.max_upload_bytes:
            raise UploadTooLargeError(f"{name}: {_size(len(data))} is over the upload limit of "
                                      f"{_size(self.limits.max_upload_bytes)}; downscale or compress it")
        with self._lock:
            if self._uploads >= self.limits.max_uploads:
                raise ExploreRequestError(f"{name}: this session already holds {self.limits.max_uploads} "
                                          "uploads; restart `cleandift explore` or serve the images as a "
                                          "folder")
            self._uploads += 1
            path = self.upload_dir / f"upload-{self._uploads:04d}"
        path.write_bytes(data)
        try:
            width, height = self._checked_header(path, name)
            image = self._decode(path, name)
        except ExploreRequestError:
            path.unlink(missing_ok=True)
            raise
        entry = self._add(name, path, width, height, "upload")
        self._keep(entry.id, image)
        return entry

    def _add(self, name: str, path: Path, width: int, height: int, origin: str) -> ImageEntry:
        with self._lock:
            entry = ImageEntry(len(self._entries), name, path, width, height, origin)
            self._entries[entry.id] = entry
        return entry

    def _checked_header(self, path: Path, name: str) -> tuple[int, int]:
        """Header size, refusing unreadable formats and too many pixels before anything is decoded."""
        try:
            width, height = header_size(path, self.limits.max_pixels)
        except Image.DecompressionBombError as exc:  # PIL's guard (as in cleandift.images.load_image)
            raise UploadTooLargeError(f"{name}: refused as a decompression bomb (its header claims over "
                                      f"{2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels); downscale "
                                      "it") from exc
        except FileNotFoundError as exc:
            raise ExploreRequestError(f"{name}: file not found") from exc
        except UnidentifiedImageError as exc:
            raise ExploreRequestError(f"{name}: not a readable image format; use PNG or JPEG") from exc
        except Exception as exc:  # noqa: BLE001 - hostile headers raise many types; name the file instead
            raise ExploreRequestError(f"{name}: unreadable image header ({type(exc).__name__})") from exc
        if width * height > self.limits.max_pixels:
            raise UploadTooLargeError(f"{name}: {width}x{height} px is over the limit of "
                                      f"{self.limits.max_pixels / 1e6:.0f} megapixels; downscale it")
        if min(width, height) < self.min_side:
            raise ExploreRequestError(f"{name}: {width}x{height} px is smaller than {self.min_side} px; "
                                      "use a larger image")
        return width, height

    def _decode(self, path: Path, name: str) -> Image.Image:
        try:
            return load_image(path, min_side=self.min_side)
        except BadImageError as exc:  # its message names our temporary path; name the user's file instead
            raise ExploreRequestError(f"{name}: {exc.reason}") from exc

    # ------------------------------------------------------------------ reading
    def get(self, image_id: int) -> ImageEntry:
        valid = isinstance(image_id, int) and not isinstance(image_id, bool)
        entry = self._entries.get(image_id) if valid else None
        if entry is None:
            raise UnknownImageError(f"unknown image id {image_id!r}; GET /api/images lists the ids")
        return entry

    def list(self) -> list[dict]:
        return [entry.info() for entry in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    def image(self, image_id: int) -> Image.Image:
        """The decoded, upright RGB image (a few are kept in memory)."""
        entry = self.get(image_id)
        with self._lock:
            if image_id in self._decoded:
                self._decoded.move_to_end(image_id)
                return self._decoded[image_id]
        image = self._decode(entry.path, entry.name)
        self._keep(image_id, image)
        return image

    def _keep(self, image_id: int, image: Image.Image) -> None:
        with self._lock:
            self._decoded[image_id] = image
            while len(self._decoded) > _DECODED_KEPT:
                self._decoded.popitem(last=False)

    def encoded(self, image_id: int) -> tuple[bytes, str]:
        """``(bytes, media type)`` for the browser: always the decoded upright image re-encoded.

        Re-encoding (rather than sending the file) makes what the page shows exactly the pixels the
        coordinates refer to -- EXIF rotation applied, 16-bit and CMYK converted -- and lets browsers
        show TIFF or PGM files.
        """
        image = self.image(image_id)
        buf = io.BytesIO()
        if image.width * image.height > 1_000_000:
            image.save(buf, format="JPEG", quality=92)
            return buf.getvalue(), "image/jpeg"
        image.save(buf, format="PNG")
        return buf.getvalue(), "image/png"

    def close(self) -> None:
        self._tmp.cleanup()


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


# ---------------------------------------------------------------------------------------------- samples
#: bundled Fashion-MNIST test images shown by default: (label, how many); two boots match, the rest differ
SAMPLE_CLASSES = ((9, 2), (7, 1), (0, 1), (8, 1))
SAMPLE_SCALE = 8  #: display upscaling (nearest: the model sees exactly the training pixels again)


def write_sample_images(folder: str | os.PathLike, model_size: int = 32) -> list[Path]:
    """Write a handful of bundled Fashion-MNIST test images as PNGs (for the default ``mini`` session).

    Each 28 px garment is padded to the mini model's 32 px frame (how it was trained) and upscaled
    with nearest-neighbour, so resizing back to 32 px gives the training pixels and one model pixel is
    a visible block on the page.
    """
    import torch  # noqa: PLC0415

    from ..pretrain.idx import BUNDLED_SUBSET_DIR, load_idx_dataset, to_model_range  # noqa: PLC0415

    images, labels = load_idx_dataset(BUNDLED_SUBSET_DIR, "test")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = _class_names()
    paths = []
    for label, count in SAMPLE_CLASSES:
        for n, index in enumerate(torch.nonzero(labels == label).flatten()[:count].tolist(), start=1):
            x = to_model_range(images[index:index + 1], model_size)[0, 0]
            pixels = ((x + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            side = model_size * SAMPLE_SCALE
            image = Image.fromarray(pixels, mode="L").resize((side, side), Image.NEAREST)
            slug = re.sub(r"[^a-z0-9]+", "-", names[label].lower()).strip("-")
            path = folder / f"{slug}-{n}.png"
            image.save(path)
            paths.append(path)
    return paths


def _class_names() -> list[str]:
    import json  # noqa: PLC0415

    from ..backbones.pixel import BUNDLED_MINI_DIR, METADATA_FILE  # noqa: PLC0415

    return json.loads((BUNDLED_MINI_DIR / METADATA_FILE).read_text())["class_names"]
