"""Training images: a folder (recursive) of jpg / png / webp with optional caption sidecars.

* Captions: ``name.txt`` (whole file, stripped) or ``name.json`` with ``{"caption": ...}`` next to
  ``name.jpg`` (the reference layout); images without one get the default prompt.
* Preprocessing: centre crop + resize to the model resolution (paper; ``resize="crop"``) or a plain
  aspect-distorting resize (reference code; ``resize="stretch"``), pixels in ``[-1, 1]``.
* Bad files never stop a run: headers are checked up front (:func:`check_images`) and a file that
  still fails to decode is replaced by the next readable image in the stream; both kinds are
  reported with a warning and counted in the logs.
* MNIST-style idx files (e.g. Fashion-MNIST for the offline ``mini`` model) are accepted too: a folder
  holding ``train-images-idx3-ubyte[.gz]`` or the images file itself (:class:`IdxImages`); images are
  padded / resized exactly as in pretraining.
* Order: an endless stream of seeded per-epoch permutations. Its only state is the number of batches
  consumed, so a resumed run continues with exactly the batches an uninterrupted one would see.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import BadImageError, DatasetError
from ..images import image_to_tensor, load_image, resize_image

log = logging.getLogger(__name__)

TRAIN_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str | None = None


def read_caption(image_path: Path) -> str | None:
    """Caption from ``<stem>.txt`` or ``<stem>.json`` (``{"caption": ...}``) next to the image."""
    txt = image_path.with_suffix(".txt")
    if txt.is_file():
        try:
            return txt.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as exc:
            log.warning("%s: cannot read caption (%s); using the default prompt", txt, exc)
            return None
    js = image_path.with_suffix(".json")
    if js.is_file():
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: not valid JSON (%s); using the default prompt", js, exc)
            return None
        caption = data.get("caption") if isinstance(data, dict) else None
        return str(caption).strip() if caption is not None else None
    return None


def scan_folder(root: str | Path, captions: bool = True) -> list[ImageRecord]:
    """All training images under ``root`` (recursive, sorted); raises :class:`DatasetError` if none."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: training folder not found (pass --data DIR with jpg/png/webp images)")
    if not root.is_dir():
        raise DatasetError(f"{root}: --data must be a folder of images, not a file")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TRAIN_SUFFIXES)
    if not files:
        raise DatasetError(f"{root}: no training images found (looked recursively for "
                           f"{', '.join(TRAIN_SUFFIXES)}); point --data at a folder that contains them")
    return [ImageRecord(p, read_caption(p) if captions else None) for p in files]


def check_images(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[tuple[str, str]]]:
    """Cheap header check of every file; returns ``(readable, [(path, reason), ...])``.

    Catches empty, non-image and mislabelled files without decoding pixels; truncated data that
    only shows when decoding is handled later by :class:`ImageFolder`.
    """
    good: list[ImageRecord] = []
    bad: list[tuple[str, str]] = []
    for rec in records:
        try:
            if rec.path.stat().st_size == 0:
                raise ValueError("file is empty (0 bytes)")
            with Image.open(rec.path) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            bad.append((str(rec.path), str(exc) or type(exc).__name__))
            continue
        good.append(rec)
    return good, bad


def split_validation(records: Sequence[ImageRecord], n_val: int, seed: int
                     ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out ``n_val`` images (seeded choice) for validation, at most a quarter of the folder."""
    n_val = min(n_val, len(records) // 4)
    if n_val <= 0:
        return list(records), []
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    val_idx = set(perm[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


class ImageFolder(Dataset):
    """Decoded, resized images with captions; an undecodable file is replaced by the next good one.

    Each item is ``{"image": (3, S, S) in [-1, 1], "caption": str, "path": str, "index": int,
    "skipped": [(path, reason)]}``; ``index`` is the image actually delivered (the requested one, or the
    good one that replaced it) and ``skipped`` lists files that failed on the way (reported by the
    training loop).
    """

    def __init__(self, records: Sequence[ImageRecord], size: int, resize: str = "crop", prompt: str = "") -> None:
        if not records:
            raise DatasetError("no readable training images left after skipping unreadable files")
        self.records = list(records)
        self.size = int(size)
        self.resize = resize
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.records)

    def prompts(self) -> set[str]:
        """Every distinct prompt this dataset can yield (captions, else the default prompt)."""
        return {rec.caption if rec.caption is not None else self.prompt for rec in self.records}

    def describe_item(self, index: int) -> dict:
        """``{"caption", "path"}`` of image ``index`` without decoding it (used by the latent cache)."""
        rec = self.records[index]
        return {"caption": rec.caption if rec.caption is not None else self.prompt, "path": str(rec.path)}

    def load(self, index: int) -> torch.Tensor:
        img = load_image(self.records[index].path)
        return image_to_tensor(resize_image(img, self.size, self.resize)[0])

    def __getitem__(self, index: int) -> dict:
        skipped: list[tuple[str, str]] = []
        for k in range(len(self.records)):
            i = (index + k) % len(self.records)
            try:
                image = self.load(i)
            except BadImageError as exc:
                skipped.append((exc.path, exc.reason))
                continue
            return {"image": image, **self.describe_item(i), "index": i, "skipped": skipped}
        raise DatasetError(f"none of the {len(self.records)} training images could be decoded; "
                           f"first error: {skipped[0][0]}: {skipped[0][1]}")


class IdxImages(Dataset):
    """Training images from MNIST-style idx data, prepared like ``cleandift pretrain-mini`` does.

    Items have the :class:`ImageFolder` layout; the gray image is repeated to 3 channels (pixel models
    average it back; an SD model would see a gray photo). ``path`` is ``"<idx file>#<index>"``.
    """

    def __init__(self, images: torch.Tensor, indices: Sequence[int], size: int, source: str, prompt: str = "") -> None:
        if len(indices) == 0:
            raise DatasetError(f"{source}: no training images")
        self.images = images
        self.indices = list(indices)
        self.size = int(size)
        self.source = source
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.indices)

    def prompts(self) -> set[str]:
        return {self.prompt}

    def describe_item(self, index: int) -> dict:
        return {"caption": self.prompt, "path": f"{self.source}#{self.indices[index]}"}

    def __getitem__(self, index: int) -> dict:
        from ..pretrain.idx import to_model_range  # noqa: PLC0415

        i = self.indices[index]
        image = to_model_range(self.images[i:i + 1], self.size)[0].expand(3, -1, -1).contiguous()
        return {"image": image, **self.describe_item(index), "index": index, "skipped": []}


def idx_source(data: str | Path) -> Path | None:
    """The images idx file of the training split if ``data`` is idx data, else ``None``."""
    from ..pretrain.idx import resolve_split  # noqa: PLC0415

    path = Path(data).expanduser()
    if path.is_dir() and any(path.glob("*.png")) or not path.exists():
        return None
    try:
        return resolve_split(path, "train")[0]
    except DatasetError:
        return None


def prepare_idx_datasets(images_file: Path, size: int, val_images: int, prompt: str, seed: int
                         ) -> tuple[IdxImages, IdxImages | None]:
    from ..pretrain.idx import load_idx_dataset  # noqa: PLC0415

    images, _ = load_idx_dataset(images_file, "train")
    n_val = min(val_images, len(images) // 4)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    val_idx = set(perm[:n_val])
    train = [i for i in range(len(images)) if i not in val_idx]
    val = sorted(val_idx)
    train_set = IdxImages(images, train, size, str(images_file), prompt)
    return train_set, IdxImages(images, val, size, str(images_file), prompt) if val else None


def collate(items: list[dict]) -> dict:
    """Batch items: ``images`` (decoded items) or ``moments`` ``(mean, std or None)`` (latent-cache items,
    :mod:`cleandift.train.latent_cache`), plus ``captions``, ``paths``, ``indices`` and ``skipped``."""
    batch = {
        "captions": [it["caption"] for it in items],
        "paths": [it["path"] for it in items],
        "indices": [it.get("index") for it in items],
        "skipped": [s for it in items for s in it["skipped"]],
    }
    if "mean" in items[0]:  # in the memory layout the VAE returned them in: it decides the denoiser's kernels
        mean_layout, std_layout = items[0].get("layout") or ("contiguous", "contiguous")
        std = [it["std"] for it in items]
        batch["moments"] = (_in_layout(torch.stack([it["mean"] for it in items]), mean_layout),
                            None if std[0] is None else _in_layout(torch.stack(std), std_layout))
    else:
        batch["images"] = torch.stack([it["image"] for it in items])
    return batch


def _in_layout(t: torch.Tensor, layout: str | None) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


class StreamBatchSampler:
    """Endless batches from seeded per-epoch permutations, resumable from a batch count.

    Global batch ``k`` covers stream positions ``[k*B*R, (k+1)*B*R)`` of the concatenated epochs
    (``B`` per-process batch, ``R`` processes); process ``rank`` takes its ``B`` consecutive ones.
    Epoch ``e`` is ``randperm(n)`` seeded with ``seed + e`` (or ``arange`` without shuffling).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_batch: int = 0,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True) -> None:
        if num_items < 1:
            raise DatasetError("cannot sample batches from an empty dataset")
        self.n = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self._epoch_cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
                     if self.shuffle else list(range(self.n)))
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def indices_at(self, position: int, count: int) -> list[int]:
        out = []
        for p in range(position, position + count):
            out.append(self.epoch_order(p // self.n)[p % self.n])
        return out

    def batch(self, k: int) -> list[int]:
        start = (k * self.num_replicas + self.rank) * self.batch_size
        return self.indices_at(start, self.batch_size)

    def epoch_of(self, k: int) -> float:
        """Epochs completed (fractional) after ``k`` global batches."""
        return k * self.batch_size * self.num_replicas / self.n

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start_batch
        while True:
            yield self.batch(k)
            k += 1


def make_loader(dataset: ImageFolder, sampler: StreamBatchSampler, workers: int = 0) -> DataLoader:
    """A DataLoader over the endless stream (``workers`` decode images in parallel processes).

    Workers ignore SIGINT / SIGTERM / SIGHUP: the main process stops the run gracefully on them
    (:mod:`cleandift.signals`), which a worker dying of the same signal would turn into a crash.
    """
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      persistent_workers=False, prefetch_factor=2 if workers > 0 else None,
                      worker_init_fn=_worker_init if workers > 0 else None)


def _worker_init(_worker_id: int) -> None:
    from ..signals import ignore_stop_signals  # noqa: PLC0415

    ignore_stop_signals()


def prepare_datasets(data: str | Path, size: int, *, val_data: str | Path | None = None, val_images: int = 8,
                     resize: str = "crop", captions: bool = True, prompt: str = "", seed: int = 0
                     ) -> tuple[ImageFolder, ImageFolder | None, list[tuple[str, str]]]:
    """Scan, check and split; returns ``(train, val or None, skipped files)``. No model is touched."""
    images_file = idx_source(data) if val_data is None else None
    if images_file is not None:
        train, val = prepare_idx_datasets(images_file, size, val_images, prompt, seed)
        return train, val, []
    records = scan_folder(data, captions)
    good, bad = check_images(records)
    if val_data is not None:
        val_good, val_bad = check_images(scan_folder(val_data, captions))
        bad += val_bad
        train_records, val_records = good, val_good
    else:
        train_records, val_records = split_validation(good, val_images, seed)
    if not train_records:
        raise DatasetError(f"{data}: none of the {len(records)} images is readable "
                           f"(first: {bad[0][0]}: {bad[0][1]})" if bad else f"{data}: no training images")
    train = ImageFolder(train_records, size, resize, prompt)
    val = ImageFolder(val_records, size, resize, prompt) if val_records else None
    return train, val, bad
