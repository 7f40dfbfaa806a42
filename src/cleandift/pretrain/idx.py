"""Reader for the idx format of MNIST / Fashion-MNIST (``*-ubyte`` or ``*-ubyte.gz``), and its writer.

Format: a big-endian header ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 sizes,
then the data in C order. Fashion-MNIST uses ``0x08`` (uint8): images ``(N, 28, 28)``, labels ``(N,)``.
Every defect (wrong magic, truncated data, mismatched counts) raises :class:`~cleandift.errors.DatasetError`
naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}

#: File-name stems of the two splits, as distributed (Debian: /usr/share/datasets/fashion-mnist).
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(f"{path}: no such idx file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: cannot read ({type(exc).__name__}: {exc}); is it a complete idx(.gz) file?") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (gzipped or not) into a numpy array of its declared shape and type."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: only {len(data)} bytes; not an idx file (needs a 4-byte magic number)")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _DTYPES or ndim == 0:
        raise DatasetError(f"{path}: bad idx magic number {data[:4].hex()} (expected 0000 08 0N for uint8 data); "
                           "not an MNIST-style idx file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header ({len(data)} bytes, need {header} for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: header says shape {tuple(shape)} ({expected} data bytes) but the file has "
                           f"{len(data) - header}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8/int8 array as an idx file (gzipped if ``path`` ends in ``.gz``); used by tests and tools."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype not in _CODES:
        raise ValueError(f"write_idx supports uint8/int8, got {array.dtype}")
    payload = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"{folder}: no {stem}[.gz]; expected the Fashion-MNIST idx files "
                       f"({', '.join(s for pair in SPLIT_FILES.values() for s in pair)}), e.g. from the Debian "
                       f"package dataset-fashion-mnist in {DEFAULT_DATA_DIR}")


def resolve_split(data: str | Path, split: str = "train") -> tuple[Path, Path]:
    """Image and label files of ``split`` given a folder, or an images idx path (labels found beside it)."""
    data = Path(data).expanduser()
    if split not in SPLIT_FILES:
        raise DatasetError(f"unknown split {split!r}; choose from {', '.join(SPLIT_FILES)}")
    if data.is_dir():
        return _find(data, SPLIT_FILES[split][0]), _find(data, SPLIT_FILES[split][1])
    if data.is_file():
        name = data.name
        if "images" not in name:
            raise DatasetError(f"{data}: pass the *images* idx file (its labels file is found beside it) or the folder")
        labels = data.with_name(name.replace("images-idx3", "labels-idx1").replace("images", "labels"))
        if not labels.is_file():
            raise DatasetError(f"{data}: no labels file {labels.name} beside it")
        return data, labels
    raise DatasetError(f"{data}: no such folder or idx file")


def load_idx_dataset(data: str | Path = DEFAULT_DATA_DIR, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, H, W), labels int64 (N,))`` of an MNIST-style split, validated."""
    img_path, lab_path = resolve_split(data, split)
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3:
        raise DatasetError(f"{img_path}: expected a 3-d image array (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise DatasetError(f"{lab_path}: expected a 1-d label array (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    if len(images) == 0:
        raise DatasetError(f"{img_path}: contains no images")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_range(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 ``(N, H, W)`` -> float ``(N, 1, size, size)`` in ``[-1, 1]``.

    28x28 digits/garments are *padded* by 2 px of background on each side (no resampling, so strokes
    stay sharp and the object keeps its scale); other sizes are bilinearly resized.
    """
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h <= size and w <= size and (size - h) % 2 == 0 and (size - w) % 2 == 0:
        ph, pw = (size - h) // 2, (size - w) // 2
        return torch.nn.functional.pad(x, (pw, pw, ph, ph), value=-1.0)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


#: The Fashion-MNIST subset shipped inside the package for the offline demo (class-balanced, see
#: :func:`write_balanced_subset`): ``per_class`` train / test images per class.
BUNDLED_SUBSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "fashion-mnist"
BUNDLED_SUBSET_SIZES = {"train": 200, "test": 50}


def balanced_indices(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first ``per_class`` indices of every class, in dataset order (deterministic, no RNG)."""
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique().tolist()]
    short = [int(p.numel()) for p in picks if p.numel() < per_class]
    if short:
        raise DatasetError(f"a class has only {min(short)} images, fewer than per_class={per_class}")
    return torch.cat(picks).sort().values


def write_balanced_subset(data: str | Path, out: str | Path, sizes: dict[str, int] | None = None) -> Path:
    """Write class-balanced idx.gz subsets of the splits (how the bundled demo data was made)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (sizes or BUNDLED_SUBSET_SIZES).items():
        images, labels = load_idx_dataset(data, split)
        keep = balanced_indices(labels, per_class)
        img_name, lab_name = SPLIT_FILES[split]
        write_idx(out / f"{img_name}.gz", images[keep].numpy())
        write_idx(out / f"{lab_name}.gz", labels[keep].to(torch.uint8).numpy())
    return out
