"""Shared machinery of the linear probes (depth, segmentation) and the kNN classifier.

The probes only ever see an *extractor*: any callable
``extractor(images (B, 3, H, W) in [-1, 1], prompts=..., taps=...) -> {tap: (B, C, h, w)}``
(:class:`~cleandift.extract.CleanExtractor`, :class:`~cleandift.extract.NoisyExtractor`, or a
synthetic function in the tests). That is what makes "clean vs noisy at t" one choice made by the
caller, and the timestep sweep a loop over extractors.

Pipeline of a dense probe: each image is put into the model frame (:func:`prepare_image`), its
features are extracted once (and cached per image, in memory or on disk), the target is sampled at
the centres of the feature cells (:func:`sample_frame_grid`), a linear head is trained on the
cached features (:func:`train_probe`), and predictions are mapped back to the *original* image
(:func:`sample_original`) so metrics are computed on the untouched annotation.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..errors import DatasetError
from ..features import points_to_grid
from ..images import ResizePolicy, ResizeTransform, image_to_tensor, resize_image
from .pooling import Readout, pool_map

Extractor = Callable[..., dict[str, torch.Tensor]]
#: ``"none"`` keeps the maps (dense probes); anything else is a kNN readout of :mod:`.pooling`.
Pooling = Literal["none", Readout]


class Sample(Protocol):
    """What a dataset item must provide for feature extraction (targets are task-specific)."""

    name: str
    image: Image.Image


# ---------------------------------------------------------------------------------------------- config
@dataclass
class FeatureSpec:
    """How features are read for a probe (everything here is part of the cache key).

    Args:
        taps: tap name(s); several are bilinearly resized to the finest map and concatenated along
            channels (raw values: a linear probe must see the features as they are).
        size: side of the square model frame; ``None`` = the extractor's ``backbone.resolution``.
        resize: how an original image is put into the frame (``stretch`` as in the reference code).
        prompt: text prompt for every image (``None`` / ``""`` = unconditional).
        batch_size: images per extractor call.
        seed: seeds the noise of noisy extractors (one generator per extractor call).
    """

    taps: str | Sequence[str] | None = "us6"
    size: int | None = None
    resize: ResizePolicy = "stretch"
    prompt: str | None = None
    batch_size: int = 4
    seed: int = 0

    def tap_list(self) -> list[str] | None:
        if self.taps is None:
            return None
        if isinstance(self.taps, str):
            return [t.strip() for t in self.taps.split(",") if t.strip()]
        return list(self.taps)

    def resolve_size(self, extractor: Extractor) -> int:
        if self.size is not None:
            return int(self.size)
        backbone = getattr(extractor, "backbone", None)
        if backbone is None or not hasattr(backbone, "resolution"):
            raise ValueError("FeatureSpec.size is required for an extractor without a backbone.resolution")
        return int(backbone.resolution)


@dataclass
class ProbeTrainConfig:
    """Optimisation of a linear probe (not given by the paper; these are our named defaults).

    Args:
        epochs: passes over the training images (features are computed once and cached).
        lr: peak learning rate.
        batch_size: images per optimisation step.
        optimizer: ``adamw`` (default; robust to the very different scales of diffusion features)
            or ``sgd`` (momentum 0.9).
        weight_decay: decoupled weight decay (AdamW) / L2 (SGD).
        schedule: ``cosine`` decay to 0 over all steps, or ``constant``.
        standardize: fit a per-channel mean/std of the training features and normalise with it
            inside the probe. An affine re-parametrisation of the same linear model (so still a
            *linear* probe) that makes one learning rate work for every tap and timestep.
        seed: seeds the head initialisation and the batch order.
    """

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 8
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    standardize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {self}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


# ---------------------------------------------------------------------------------------------- geometry
def prepare_image(img: Image.Image, size: int,
                  resize: ResizePolicy = "stretch") -> tuple[torch.Tensor, ResizeTransform]:
    """An RGB image in the square model frame: ``(3, size, size)`` in ``[-1, 1]`` and its transform."""
    out, tf = resize_image(img, size, resize)
    return image_to_tensor(out), tf


def _pixel_centres(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys], dim=-1)  # (h, w, 2) as (x, y)


def _inside(xy: torch.Tensor, w: int, h: int) -> torch.Tensor:
    x, y = xy[..., 0], xy[..., 1]
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def sample_frame_grid(src: torch.Tensor, tf: ResizeTransform, grid_hw: tuple[int, int],
                      mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample an original-frame map ``(C, H, W)`` at the centres of a ``grid_hw`` grid over the model frame.

    This is how targets meet features: a feature map of ``(h, w)`` cells covers the model frame, and
    cell ``(i, j)`` sits at frame pixel ``((j + .5) W_f / w - .5, (i + .5) H_f / h - .5)``; mapping
    that point back through the resize gives where to read the annotation. ``bilinear`` equals the
    reference's bilinear downsampling of the target for ``stretch``.

    Returns the sampled ``(C, gh, gw)`` map and a boolean ``(gh, gw)`` mask of cells whose centre
    falls inside the original image (``False`` on padding).
    """
    gh, gw = grid_hw
    cells = _pixel_centres(gh, gw)
    frame_xy = (cells + 0.5) * cells.new_tensor([tf.out_w / gw, tf.out_h / gh]) - 0.5
    orig_xy = tf.to_original(frame_xy.reshape(-1, 2)).reshape(gh, gw, 2)
    h, w = src.shape[-2:]
    grid = points_to_grid(orig_xy, (h, w))[None]
    out = F.grid_sample(src[None].float(), grid, mode=mode, padding_mode="border", align_corners=False)[0]
    return out, _inside(orig_xy, w, h)


def sample_original(pred: torch.Tensor, tf: ResizeTransform,
                    mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Map a prediction ``(C, gh, gw)`` covering the model frame back onto the original ``(H, W)`` image.

    ``nearest`` gives the nearest-neighbour upsampling of the segmentation protocol; ``bilinear`` the
    depth protocol's. Returns ``(C, H, W)`` and a mask of original pixels the frame covers (all of
    them except for ``crop``, whose cut-off margins were never seen by the model).
    """
    orig_xy = _pixel_centres(tf.orig_h, tf.orig_w)
    frame_xy = tf.to_model(orig_xy.reshape(-1, 2)).reshape(tf.orig_h, tf.orig_w, 2)
    grid = points_to_grid(frame_xy, (tf.out_h, tf.out_w))[None].to(pred.device)
    out = F.grid_sample(pred[None].float(), grid, mode=mode, padding_mode="border", align_corners=False)[0]
    return out, _inside(frame_xy, tf.out_w, tf.out_h).to(pred.device)


# ---------------------------------------------------------------------------------------------- features
def combine_taps(feats: dict[str, torch.Tensor], taps: Sequence[str] | None = None) -> torch.Tensor:
    """One ``(B, C, h, w)`` map from several taps: bilinear to the finest map, concatenated along channels."""
    names = list(taps) if taps is not None else list(feats)
    missing = [n for n in names if n not in feats]
    if missing:
        raise KeyError(f"extractor returned no feature for tap(s) {missing}; got {sorted(feats)}")
    maps = [feats[n].float() for n in names]
    if len(maps) == 1:
        return maps[0]
    size = max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])
    maps = [m if tuple(m.shape[-2:]) == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps]
    return torch.cat(maps, dim=1)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_extractor(extractor: Extractor, images: torch.Tensor, spec: FeatureSpec,
                   generator: torch.Generator | None = None, pool: Pooling = "none") -> torch.Tensor:
    """Features of a batch with taps combined: ``(B, C, h, w)``, or ``(B, D)`` with a readout ``pool``.

    A readout (:func:`~cleandift.eval.pooling.pool_map`; ``avg``, global average pooling, is the kNN
    protocol) is applied to every tap before concatenation. The generator is passed only to
    extractors that accept one (noisy extraction).
    """
    taps = spec.tap_list()
    kwargs: dict = {"prompts": spec.prompt, "taps": taps}
    if generator is not None and _accepts(extractor, "generator"):
        kwargs["generator"] = generator
    feats = extractor(images, **kwargs)
    if pool == "none":
        return combine_taps(feats, taps)
    names = taps if taps is not None else list(feats)
    return torch.cat([pool_map(feats[t], pool) for t in names], dim=1)


def extractor_identity(extractor: Extractor) -> dict:
    """JSON-able identity of an extractor for cache keys and result files (incl. a weights fingerprint)."""
    info: dict = {"class": type(extractor).__name__}
    describe = getattr(extractor, "describe", None)
    if callable(describe):
        info["describe"] = describe()
    unet = getattr(extractor, "unet", None)
    if isinstance(unet, nn.Module):
        from .cache import weights_fingerprint  # noqa: PLC0415

        info["unet_fingerprint"] = weights_fingerprint(unet)
    return info


class MemoryCache:
    """In-process per-image feature store: pass it as ``cache`` to share features between probe runs in one process."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._store: dict[str, torch.Tensor] = {}

    def get(self, image_id: str) -> torch.Tensor | None:
        value = self._store.get(image_id)
        return None if value is None else value.float()

    def put(self, image_id: str, features: torch.Tensor) -> None:
        self._store[image_id] = features.detach().to("cpu", self.dtype)

    def __len__(self) -> int:
        return len(self._store)


def open_cache(cache_dir: str | Path | None, settings: dict | Callable[[], dict],
               dtype: torch.dtype = torch.float32):
    """A disk cache (:class:`cleandift.eval.cache.FeatureCache`, keyed by ``settings``) or ``None``.

    ``settings`` may be a zero-argument callable so the weights fingerprint is only computed when
    a cache folder is actually used.

    Without a folder nothing is cached across runs; within a run every image is still extracted
    only once (training keeps its features for all epochs).
    """
    if cache_dir is None:
        return None
    from .cache import FeatureCache  # noqa: PLC0415

    return FeatureCache(cache_dir, settings() if callable(settings) else settings, dtype=dtype)


class CachedFeatures(Sequence):
    """Per-image features read back from a disk cache on access (so training needs no RAM for them)."""

    def __init__(self, cache, names: Sequence[str]) -> None:
        self.cache, self.names = cache, list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        value = self.cache.get(self.names[i])
        if value is None:
            raise KeyError(f"features of {self.names[i]!r} vanished from the cache")
        return value


def collect_features(extractor: Extractor, dataset: Sequence, spec: FeatureSpec, target_fn: Callable | None,
                     cache=None, pool: Pooling = "none", desc: str = "features", progress: bool = True
                     ) -> tuple[Sequence[torch.Tensor], list]:
    """Features of every image (in memory, or read lazily from a disk cache) and ``target_fn(sample, tf, f)``."""
    feats: list[torch.Tensor] = []
    names: list[str] = []
    targets: list = []
    lazy = cache is not None and not isinstance(cache, MemoryCache)
    for _, samples, tfs, batch in iter_features(extractor, dataset, spec, cache, pool, desc, progress):
        for sample, tf, f in zip(samples, tfs, batch):
            names.append(sample.name)
            if not lazy:
                feats.append(f)
            if target_fn is not None:
                targets.append(target_fn(sample, tf, f))
    return (CachedFeatures(cache, names) if lazy else feats), targets


def _batch_seed(seed: int, names: Sequence[str]) -> int:
    digest = hashlib.sha1(json.dumps([int(seed), list(names)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def iter_features(extractor: Extractor, dataset: Sequence, spec: FeatureSpec, cache=None,
                  pool: Pooling = "none", desc: str = "features", progress: bool = True
                  ) -> Iterator[tuple[list[int], list, list[ResizeTransform], torch.Tensor]]:
    """Yield ``(indices, samples, transforms, features)`` batches, extracting only what the cache lacks.

    ``features`` is ``(B, C, h, w)`` (or ``(B, D)`` with a readout ``pool``, applied per tap before
    concatenation) in float32 on CPU. Samples are always loaded (the caller needs their
    targets); the extractor only runs for images whose features are not cached.
    """
    size = spec.resolve_size(extractor)
    n = len(dataset)
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, n, spec.batch_size):
            idx = list(range(start, min(start + spec.batch_size, n)))
            samples = [dataset[i] for i in idx]
            prepared = [prepare_image(s.image, size, spec.resize) for s in samples]
            cached = [cache.get(s.name) if cache is not None else None for s in samples]
            todo = [k for k, c in enumerate(cached) if c is None]
            if todo:
                images = torch.stack([prepared[k][0] for k in todo])
                gen = torch.Generator().manual_seed(_batch_seed(spec.seed, [samples[k].name for k in todo]))
                feats = call_extractor(extractor, images, spec, gen, pool)
                feats = feats.detach().float().cpu()
                for k, f in zip(todo, feats):
                    cached[k] = f
                    if cache is not None:
                        cache.put(samples[k].name, f)
            yield idx, samples, [p[1] for p in prepared], torch.stack(cached)
            bar.update(len(idx))
    finally:
        bar.close()


def feature_settings(extractor: Extractor, spec: FeatureSpec, dataset_id: str, pool: Pooling = "none") -> dict:
    """Everything that determines cached features (cache key; also written to result files)."""
    return {"extractor": extractor_identity(extractor), "features": asdict(spec), "pool": pool, "dataset": dataset_id}


# ---------------------------------------------------------------------------------------------- training
class FeatureNorm(nn.Module):
    """Per-channel standardisation with statistics fitted on the training features (buffers, saved with the probe)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    @torch.no_grad()
    def fit(self, feats: Sequence[torch.Tensor], eps: float = 1e-6) -> None:
        """Fit on per-image ``(C, ...)`` tensors (streamed in float64: no need to hold them together)."""
        total = torch.zeros_like(self.mean, dtype=torch.float64)
        sq = torch.zeros_like(total)
        count = 0
        for f in feats:
            flat = f.double().reshape(f.shape[0], -1)
            total += flat.sum(1).cpu()
            sq += flat.pow(2).sum(1).cpu()
            count += flat.shape[1]
        if count == 0:
            raise ValueError("cannot fit feature statistics on zero samples")
        mean = total / count
        var = (sq / count - mean.pow(2)).clamp_min(0)
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(var.sqrt().clamp_min(eps).to(self.std))


def make_optimizer(params, cfg: ProbeTrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "constant" or total <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_probe(probe: nn.Module, features: Sequence[torch.Tensor], targets: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cfg: ProbeTrainConfig,
                device: torch.device | str | None = None, desc: str = "probe", progress: bool = True) -> list[float]:
    """Train ``probe`` on per-image ``features[i]`` and ``targets[i]``; returns the mean loss of every epoch.

    ``features`` may be any indexable (a list of cached tensors); batches are stacked on the fly, so
    only one batch of features lives on ``device`` at a time.
    """
    n = len(features)
    if n == 0:
        raise ValueError("no training samples")
    device = torch.device(device) if device is not None else torch.device("cpu")
    probe.to(device).train()
    opt = make_optimizer([p for p in probe.parameters() if p.requires_grad], cfg)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    step = 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            losses = []
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                x = torch.stack([features[i] for i in idx]).to(device, torch.float32)
                y = targets[idx].to(device)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(cfg.schedule, step, total)
                loss = loss_fn(probe(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            history.append(sum(losses) / len(losses))
    finally:
        bar.close()
    probe.eval()
    return history


def seeded_module(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with a fixed initialisation without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


# ---------------------------------------------------------------------------------------------- weights / results
def save_probe(probe: nn.Module, path: str | Path, config: dict) -> Path:
    """Write the probe's state dict as safetensors; ``config`` (JSON) goes into the metadata to rebuild it."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    save_file(state, str(path), metadata={"cleandift_probe": json.dumps(config, default=str)})
    return path


def read_probe(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and config of a file written by :func:`save_probe`."""
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: probe weights not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "cleandift_probe" not in meta:
        raise ValueError(f"{path}: not a cleandift probe file (no 'cleandift_probe' metadata)")
    return state, json.loads(meta["cleandift_probe"])


@dataclass
class ProbeResult:
    """Metrics of one probe run plus what produced them (``to_dict`` is what the CLI writes)."""

    task: str
    metrics: dict
    config: dict = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    probe: nn.Module | None = None
    weights_path: str | None = None

    def to_dict(self) -> dict:
        return {"task": self.task, "metrics": self.metrics, "config": self.config,
                "train_loss": self.history, "probe_weights": self.weights_path}


def require_nonempty(items: Sequence, what: str, source: Path | str) -> None:
    """Raise :class:`DatasetError` naming ``source`` when a split is empty."""
    if len(items) == 0:
        raise DatasetError(f"{source}: {what} is empty (no images listed / found)")


def dataset_id(dataset) -> str:
    """Identity of a dataset split for cache keys and result files (its ``describe()`` or class name)."""
    describe = getattr(dataset, "describe", None)
    return describe() if callable(describe) else type(dataset).__name__
