"""``cache_latents``: encode every training image's VAE posterior once, then free the VAE encoder.

Preprocessing is deterministic (:mod:`cleandift.train.data`), so an image's posterior ``(mean, std)`` never
changes during a run. With ``cache_latents`` the trainer computes it once per image before the first step
(:func:`prepare_latent_cache`), keeps it in CPU memory, frees the VAE encoder (for a backbone the trainer
loaded itself) and feeds the moments to :meth:`~cleandift.distill.FeatureAligner.forward`, which draws the
posterior sample exactly as ``encode_images`` does.

Bit-identical to an uncached run, which takes two precautions:

* the VAE's result for one image depends on the *shape* of the batch it is encoded in (convolution kernels
  pick their blocking by batch size: a 1-image and a 5-image batch differ in the last bit on CPU), not on
  the other images in it. So training images are encoded in batches of exactly ``batch_size`` (the last one
  padded with a repeat), the shape of every training micro-batch, and validation images in the chunks
  :func:`~cleandift.train.loop.validate` uses; under the run's autocast, on its device;
* the moments' *memory layout* is part of the result: on CPU the VAE returns channels-last tensors, the
  latents inherit that layout and the denoiser's convolutions then run another (not bit-equal) kernel. Each
  item records its layout and :func:`~cleandift.train.data.collate` restores it on the batch.

Persistence: ``RUN_DIR/latents.safetensors`` (tensors only, never pickle) with ``RUN_DIR/latents.json``
recording what the moments depend on (model and VAE weights fingerprint, size, resize, batch size,
precision, device type, torch version, every image's path + mtime + size). A resume, or a new run in the
same folder, reuses the file only if all of it matches; anything else rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .data import IdxImages, _worker_init, collate

log = logging.getLogger(__name__)

CACHE_FILE = "latents.safetensors"
SIDECAR_FILE = "latents.json"
FORMAT = "cleandift-latent-cache"
VERSION = 1
#: Refuse a cache larger than this share of the available RAM.
MAX_RAM_FRACTION = 0.25


class CachedLatents(Dataset):
    """A dataset's items with cached posterior moments in place of the decoded image.

    Item ``k`` is ``{"mean", "std" (or None), "layout", "caption", "path", "index", "skipped"}`` where
    ``index`` and ``skipped`` are what the image dataset delivered for ``k`` when the cache was built (an
    undecodable file is replaced by the next good image, as during uncached training) and ``layout`` the
    memory formats the encoder returned the moments in (see the module docstring).
    """

    def __init__(self, dataset, mean: torch.Tensor, std: torch.Tensor | None,
                 items: Sequence[tuple[int, list, Sequence[str | None]]]):
        if len(items) != len(dataset) or mean.shape[0] != len(dataset):
            raise ValueError(f"latent cache holds {mean.shape[0]} items for a dataset of {len(dataset)}")
        self.dataset = dataset
        self.mean = mean
        self.std = std
        self.items = [(int(i), [tuple(s) for s in skipped], tuple(layout)) for i, skipped, layout in items]

    def __len__(self) -> int:
        return len(self.items)

    def prompts(self) -> set[str]:
        return self.dataset.prompts()

    def __getitem__(self, k: int) -> dict:
        index, skipped, layout = self.items[k]
        return {"mean": self.mean[k], "std": None if self.std is None else self.std[k], "layout": layout,
                **self.dataset.describe_item(index), "index": index, "skipped": list(skipped)}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.std) if t is not None)


@dataclass
class LatentCache:
    """The cached moments of the training (and validation) images."""

    train: CachedLatents
    val: CachedLatents | None
    source: str  # "built" or "file"

    @property
    def nbytes(self) -> int:
        return self.train.nbytes + (self.val.nbytes if self.val is not None else 0)


def model_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor | None, dict]:
    """``(images, kwargs)`` for the aligner from a collated batch: decoded images, or cached ``moments``."""
    moments = batch.get("moments")
    if moments is None:
        return batch["images"].to(device), {}
    mean, std = moments
    return None, {"moments": (mean.to(device), None if std is None else std.to(device))}


# ---------------------------------------------------------------------------------------------- entry
def prepare_latent_cache(config, backbone, train_set, val_set, run_dir: str | Path | None, accelerator=None,
                         release: bool = True) -> LatentCache | None:
    """Load or build the cache for ``config.cache_latents`` runs; optionally free the VAE encoder.

    Returns ``None`` (nothing cached) for backbones without a VAE (pixel-space models encode nothing).
    ``run_dir``: where the cache is persisted (``None``: memory only). ``accelerator``: its device and
    autocast are used (``None``: the backbone's device, no autocast); under several processes the main one
    builds and writes the file, the others read it. ``release``: free the VAE encoder afterwards (only for a
    backbone the trainer loaded itself; a caller's backbone is never mutated).
    """
    if getattr(backbone, "vae", None) is None:
        log.info("cache_latents: %s has no VAE (a pixel-space model): nothing to cache", backbone.name)
        return None
    check_cache_memory(backbone, train_set, val_set, config)
    device = accelerator.device if accelerator is not None else backbone.device
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    main = accelerator is None or accelerator.is_main_process
    run_dir = Path(run_dir).expanduser() if run_dir is not None else None
    key = cache_key(config, backbone, train_set, val_set, device)

    cache = None
    if run_dir is not None and not main:
        accelerator.wait_for_everyone()  # the main process writes the file first
    if run_dir is not None:
        cache = load_cache(run_dir, key, train_set, val_set)
    if cache is None:
        cache = build_cache(backbone, train_set, val_set, config.batch_size, config.sample_posterior, device,
                            autocast, workers=config.workers)
        if run_dir is not None and main:
            save_cache(run_dir, key, cache)
    if run_dir is not None and main and accelerator is not None:
        accelerator.wait_for_everyone()

    n = len(train_set) + (len(val_set) if val_set is not None else 0)
    freed = backbone.release_encoder() if release else 0
    log.info("cache_latents: %s the VAE posterior of %d image(s): %.1f MB in RAM%s%s",
             "loaded" if cache.source == "file" else "encoded", n, cache.nbytes / 1e6,
             f" ({run_dir / CACHE_FILE})" if run_dir is not None else "",
             f"; released the VAE encoder ({freed / 1e9:.2f} GB)" if freed else "")
    return cache


# ---------------------------------------------------------------------------------------------- memory
def cache_nbytes(backbone, n_images: int, size: int, sample_posterior: bool = True) -> int:
    """Bytes the moments of ``n_images`` images at ``size`` px take (float32 upper bound)."""
    c, h, w = backbone.input_shape((size, size))
    return n_images * (2 if sample_posterior else 1) * c * h * w * 4


def available_memory() -> int | None:
    """Bytes of RAM available now (psutil if installed, else ``os.sysconf``); ``None`` if unknown."""
    try:
        import psutil  # noqa: PLC0415

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_cache_memory(backbone, train_set, val_set, config) -> int:
    """Refuse a cache over :data:`MAX_RAM_FRACTION` of the available RAM; returns its size in bytes.

    Every training process holds its own copy: the processes on this machine (``LOCAL_WORLD_SIZE``, set by
    ``accelerate launch`` / ``torchrun``) are counted together.
    """
    n = len(train_set) + (len(val_set) if val_set is not None else 0)
    need = cache_nbytes(backbone, n, int(train_set.size), config.sample_posterior)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    free = available_memory()
    if free is not None and need * local > MAX_RAM_FRACTION * free:
        copies = f" x {local} processes" if local > 1 else ""
        raise ConfigError(f"--cache-latents: the latents of {n} images at {train_set.size} px need "
                          f"{need / 1e9:.1f} GB{copies}, more than a quarter of the {free / 1e9:.1f} GB of available "
                          "RAM; drop --cache-latents (or train on fewer images / a smaller --size)")
    return need


# ---------------------------------------------------------------------------------------------- build
@torch.no_grad()
def build_cache(backbone, train_set, val_set, batch_size: int, sample_posterior: bool, device, autocast,
                workers: int = 0) -> LatentCache:
    """Encode every item once: training items in batches of exactly ``batch_size``, validation items in
    :func:`~cleandift.train.loop.validate`'s chunks (see the module docstring for why)."""
    train = _encode_dataset(backbone, train_set, batch_size, True, sample_posterior, device, autocast, workers)
    val = (_encode_dataset(backbone, val_set, batch_size, False, sample_posterior, device, autocast, workers)
           if val_set is not None else None)
    return LatentCache(train, val, "built")


def _encode_dataset(backbone, dataset, batch_size: int, pad: bool, sample_posterior: bool, device, autocast,
                    workers: int) -> CachedLatents:
    n = len(dataset)
    chunks = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    mean = std = None
    items: list[tuple[int, list, tuple]] = []
    loader = DataLoader(dataset, batch_sampler=chunks, num_workers=workers, collate_fn=_collate_items,
                        worker_init_fn=_worker_init if workers > 0 else None)
    for positions, (batch, skipped) in zip(chunks, loader):
        images = batch["images"]
        if pad and images.shape[0] < batch_size:  # the batch shape every training step encodes
            images = torch.cat([images, images[-1:].expand(batch_size - images.shape[0], -1, -1, -1)])
        with autocast():
            m, s = backbone.image_moments(images.to(device))
        layout = (memory_layout(m), memory_layout(s) if s is not None and sample_posterior else None)
        m = m[:len(positions)].cpu()
        s = s[:len(positions)].cpu() if s is not None and sample_posterior else None
        if mean is None:
            mean = torch.empty((n, *m.shape[1:]), dtype=m.dtype)
            std = torch.empty((n, *s.shape[1:]), dtype=s.dtype) if s is not None else None
        mean[positions[0]:positions[-1] + 1] = m
        if std is not None:
            std[positions[0]:positions[-1] + 1] = s
        items += [(i, skip, layout) for i, skip in zip(batch["indices"], skipped)]
    return CachedLatents(dataset, mean, std, items)


def memory_layout(t: torch.Tensor) -> str:
    """``"channels_last"`` for a (B, C, H, W) tensor in that memory format, else ``"contiguous"``."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous"


def _collate_items(items: list[dict]) -> tuple[dict, list[list]]:
    """The batch, and each item's own ``skipped`` list (re-delivered with the item in every step)."""
    return collate(items), [it["skipped"] for it in items]


# ---------------------------------------------------------------------------------------------- persistence
def cache_key(config, backbone, train_set, val_set, device) -> dict:
    """Everything the cached moments depend on; a persisted cache is used only if its key is equal."""
    return {
        "format": FORMAT, "version": VERSION,
        "model": str(config.model), "backbone": backbone.name, "vae_sha256": vae_fingerprint(backbone),
        "size": int(train_set.size), "resize": getattr(train_set, "resize", None),
        "batch_size": int(config.batch_size), "precision": config.dtype, "sample_posterior": config.sample_posterior,
        "device": torch.device(device).type, "torch": torch.__version__,
        "train": image_list(train_set), "val": image_list(val_set) if val_set is not None else None,
    }


def vae_fingerprint(backbone) -> str:
    """sha256 of the VAE encoder's weights (a changed model file at the same path is caught)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.vae.state_dict().items()):
        if name.startswith(("decoder.", "post_quant_conv.")):
            continue
        t = tensor.detach().reshape(-1).contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def image_list(dataset) -> list | dict:
    """Path, mtime and size of every source image (idx data: the file and a digest of the indices)."""
    if isinstance(dataset, IdxImages):
        st = _stat(dataset.source)
        indices = hashlib.sha256(json.dumps(dataset.indices).encode()).hexdigest()
        return {"source": dataset.source, **st, "indices_sha256": indices}
    return [{"path": str(rec.path), **_stat(rec.path)} for rec in dataset.records]


def _stat(path) -> dict:
    try:
        st = os.stat(path)
    except OSError:
        return {"mtime_ns": None, "size": None}
    return {"mtime_ns": st.st_mtime_ns, "size": st.st_size}


def save_cache(run_dir: Path, key: dict, cache: LatentCache) -> None:
    """Write ``latents.safetensors`` + ``latents.json`` (the old sidecar goes first: never a stale pair)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    run_dir.mkdir(parents=True, exist_ok=True)
    tensors, items = {}, {}
    for split, ds in (("train", cache.train), ("val", cache.val)):
        if ds is None:
            continue
        tensors[f"{split}.mean"] = ds.mean.contiguous()
        if ds.std is not None:
            tensors[f"{split}.std"] = ds.std.contiguous()
        items[split] = [[i, [list(s) for s in skipped], list(layout)] for i, skipped, layout in ds.items]
    sidecar = run_dir / SIDECAR_FILE
    tmp_t, tmp_s = run_dir / (CACHE_FILE + ".tmp"), run_dir / (SIDECAR_FILE + ".tmp")
    try:
        save_file(tensors, str(tmp_t), metadata={"format": FORMAT})
        tmp_s.write_text(json.dumps({"key": key, "items": items, "bytes": cache.nbytes}), encoding="utf-8")
        sidecar.unlink(missing_ok=True)
        os.replace(tmp_t, run_dir / CACHE_FILE)
        os.replace(tmp_s, sidecar)
    except OSError as exc:  # a cache that cannot be written only costs the re-encode on resume
        log.warning("cache_latents: could not write %s (%s); the cache stays in memory only", run_dir / CACHE_FILE,
                    exc)
        for tmp in (tmp_t, tmp_s):
            tmp.unlink(missing_ok=True)


def load_cache(run_dir: Path, key: dict, train_set, val_set) -> LatentCache | None:
    """The persisted cache if it exists and its key equals ``key`` (else ``None``, saying why)."""
    path, sidecar = run_dir / CACHE_FILE, run_dir / SIDECAR_FILE
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        stale = _key_difference(meta.get("key"), key)
        if stale:
            log.info("cache_latents: %s is stale (%s); encoding the images again", path, stale)
            return None
        from safetensors.torch import load_file  # noqa: PLC0415

        tensors = load_file(str(path))
        splits = {}
        for split, ds in (("train", train_set), ("val", val_set)):
            if ds is None:
                splits[split] = None
                continue
            splits[split] = CachedLatents(ds, tensors[f"{split}.mean"], tensors.get(f"{split}.std"),
                                          meta["items"][split])
    except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        log.warning("cache_latents: cannot use %s (%s: %s); encoding the images again", path, type(exc).__name__, exc)
        return None
    if key["sample_posterior"] and (splits["train"].std is None or (val_set is not None and splits["val"].std is None)):
        log.warning("cache_latents: %s holds no posterior std; encoding the images again", path)
        return None
    return LatentCache(splits["train"], splits["val"], "file")


def _key_difference(old: dict | None, new: dict) -> str:
    """A short reason why ``old`` is not ``new`` ("" if equal)."""
    if not isinstance(old, dict):
        return "no key"
    for name in new:
        if old.get(name) == new[name]:
            continue
        if name in ("train", "val") and isinstance(old.get(name), list) and isinstance(new[name], list):
            before = {e["path"]: e for e in old[name]}
            changed = [e["path"] for e in new[name] if before.get(e["path"]) != e]
            gone = len(before.keys() - {e["path"] for e in new[name]})
            what = f"{len(changed)} new or modified, e.g. {changed[0]}" if changed else f"{gone} removed"
            return f"{name} images changed: {what}"
        return f"{name} changed"
    return ""
