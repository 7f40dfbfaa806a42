"""Named correspondence protocols, resolved into one explicit settings object saved with every result.

Users could not reproduce DIFT's SPair number because one flag differed from the README (DIFT #24),
and PCK conventions differ between papers (GeoAware-SC #14). So every setting that changes a number
lives in :class:`CorrespondenceSettings`; a preset is a named set of values for it; resolution is
``dataclass defaults -> preset -> dataset defaults -> explicit overrides``, unknown keys raise
:class:`~cleandift.errors.ConfigError`, and the resolved settings are written next to the results.

Presets (sources: anchors §3-§5, §12c, §12f):

``dift-spair``
    DIFT (Tang et al.): SD 2.1, images stretched to 768 x 768, noise at t = 261, tap ``us6``
    (``up_ft_index=1``, 1/16 resolution), 8 noise draws averaged (VAE posterior sampled), prompt
    ``"a photo of a {category}"``, features bilinearly upsampled to the original image, cosine
    argmax over its pixels, ``dist / thr <= alpha``.
``cleandift-spair``
    The same with CleanDIFT extraction: one pass of the student on the clean latent at timestep
    input 261 (pass ``checkpoint``); no ensemble.
``sd-dino`` / ``cleandift-sd-dino``
    A Tale of Two Features: SD 1.5 at 960 px (longer side, zero-padded), taps ``us2, us5, us8``
    (ODISE s5/s4/s3 = maps #2, #5, #8), noise at t = 100 from one fixed draw shared by all images
    (seed 42, VAE posterior mean), fused with DINOv2 ViT-B/14 (840 px, layer 11, token) after
    co-PCA to 256 dims per SD layer; argmax over patch centres, strict ``<``. The ODISE implicit
    captioner is not available, so the prompt is ``"A photo of a {category}"`` as in CleanDIFT's
    reproduction. Built by :mod:`cleandift.eval.fusion`.
``tlfr-zero-shot`` / ``cleandift-tlfr-zero-shot``
    Telling Left from Right, zero-shot: SD 1.5 at 960 px padded, taps ``us2, us5, us8``, t = 50
    (CleanDIFT: clean, 261), FreeU off, DINOv2 ViT-B/14 at 840 px; per-part L2 normalisation;
    window soft-argmax (+-5 cells, temperature 0.02) over patch centres, ``<``. Built by
    :mod:`cleandift.eval.fusion`. TLFR's adaptive flip test needs SPair's per-category table of
    left/right keypoint pairs, which cleandift does not ship (the only public copy is in a repository
    without a licence): it is **off** here; switch it on with
    ``--fusion adaptive_flip=true --fusion flip_permutations=FLIP.json`` (format in
    :func:`cleandift.eval.fusion.load_flip_permutations`).

The CleanDIFT paper reports per-keypoint PCK; both aggregations and both thresholds (where the
dataset has boxes) are always reported anyway.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

DESCRIPTORS: tuple[str, ...] = ("diffusion", "dinov2", "sd-dino", "tlfr")
DATASETS: tuple[str, ...] = ("spair", "pfpascal")


@dataclass(frozen=True)
class CorrespondenceSettings:
    """Every setting of a correspondence evaluation (see :mod:`cleandift.eval.presets`).

    Descriptor: ``descriptor`` (``diffusion`` or a fusion kind), ``model`` / ``checkpoint`` (backbone
    and student weights), ``mode`` (``clean`` | ``noisy``), ``t`` (noisy: noise timestep),
    ``clean_timestep`` (clean: the student's timestep input), ``ensemble`` / ``noise`` /
    ``sample_posterior`` (noisy draws), ``taps``, ``size`` / ``resize`` (input frame), ``prompt``
    (template; ``{category}`` is replaced, ``""`` = unconditional), ``seed``, ``fusion`` (settings of
    fusion descriptors, passed through to :mod:`cleandift.eval.fusion`).

    Matching (:mod:`cleandift.eval.matching`): ``method``, ``grid``, ``source``, ``window``, ``temperature``.

    PCK (:mod:`cleandift.eval.pck`): ``alphas``, ``thresholds`` (``None`` = dataset default: SPair
    ``bbox`` + ``img``, PF-Pascal ``img``), ``comparison``.

    Run: ``dataset``, ``split``, ``categories``, ``limit`` (pairs per category), ``device``, ``dtype``,
    ``chunk_size`` (U-Net samples per forward), ``preset`` (the name it came from).
    """

    descriptor: str = "diffusion"
    model: str = "sd21"
    checkpoint: str | None = None
    mode: str = "noisy"
    t: int = 261
    clean_timestep: float = 261.0
    ensemble: int = 8
    noise: str = "independent"
    sample_posterior: bool = True
    taps: tuple[str, ...] = ("us6",)
    size: int = 768
    resize: str = "stretch"
    prompt: str = "a photo of a {category}"
    seed: int = 0
    fusion: dict = field(default_factory=dict)
    method: str = "argmax"
    grid: str = "pixels"
    source: str = "bilinear"
    window: int = 5
    temperature: float = 0.02
    alphas: tuple[float, ...] = (0.01, 0.05, 0.1, 0.15)
    thresholds: tuple[str, ...] | None = None
    comparison: str = "<="
    dataset: str = "spair"
    split: str = "test"
    categories: tuple[str, ...] | None = None
    limit: int | None = None
    device: str | None = None
    dtype: str = "fp32"
    chunk_size: int = 8
    preset: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    def descriptor_settings(self) -> dict[str, Any]:
        """Only what changes the features (for the cache key); matching / PCK / run keys excluded."""
        keys = ("descriptor", "model", "checkpoint", "mode", "taps", "size", "resize", "prompt", "seed",
                "fusion", "dtype")
        out = {k: getattr(self, k) for k in keys}
        if self.mode == "noisy":
            out.update(t=self.t, ensemble=self.ensemble, noise=self.noise,
                       sample_posterior=self.sample_posterior)
        else:
            out.update(clean_timestep=self.clean_timestep)
        return _jsonable(out)

    def format_prompt(self, category: str) -> str:
        return self.prompt.format(category=category) if self.prompt else ""


_DIFT = dict(descriptor="diffusion", model="sd21", mode="noisy", t=261, ensemble=8, noise="independent",
             sample_posterior=True, taps=("us6",), size=768, resize="stretch",
             prompt="a photo of a {category}", seed=0, method="argmax", grid="pixels", source="bilinear",
             comparison="<=")
_SD_DINO = dict(descriptor="sd-dino", model="sd15", mode="noisy", t=100, ensemble=1, noise="shared",
                sample_posterior=False, taps=("us2", "us5", "us8"), size=960, resize="pad",
                prompt="A photo of a {category}", seed=42, method="argmax", grid="cells", source="cell",
                comparison="<",
                fusion=dict(dinov2="facebook/dinov2-base", dino_size=840, dino_layer=11, facet="token",
                            co_pca=True, pca_dims=(256, 256, 256), weights=(1.0, 1.0)))
_TLFR = dict(descriptor="tlfr", model="sd15", mode="noisy", t=50, ensemble=1, noise="shared",
             sample_posterior=False, taps=("us2", "us5", "us8"), size=960, resize="pad",
             prompt="A photo of a {category}", seed=42, method="soft-argmax", grid="cells", source="cell",
             window=5, temperature=0.02, comparison="<",
             fusion=dict(dinov2="facebook/dinov2-base", dino_size=840, dino_layer=11, facet="token",
                         adaptive_flip=False, freeu=False))
_CLEAN = dict(mode="clean", clean_timestep=261.0, ensemble=1, sample_posterior=False)

PRESETS: dict[str, dict[str, Any]] = {
    "dift-spair": _DIFT,
    "cleandift-spair": {**_DIFT, **_CLEAN},
    "sd-dino": _SD_DINO,
    "cleandift-sd-dino": {**_SD_DINO, **_CLEAN},
    "tlfr-zero-shot": _TLFR,
    "cleandift-tlfr-zero-shot": {**_TLFR, **_CLEAN},
}

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "spair": {"thresholds": ("bbox", "img")},
    "pfpascal": {"thresholds": ("img",)},
}

_CHOICES = {
    "descriptor": DESCRIPTORS, "mode": ("clean", "noisy"), "noise": ("independent", "shared"),
    "resize": ("stretch", "pad", "crop"), "method": ("argmax", "soft-argmax"), "grid": ("pixels", "cells"),
    "source": ("bilinear", "cell"), "comparison": ("<=", "<"), "dataset": DATASETS,
}


def resolve_settings(preset: str | None = None, **overrides: Any) -> CorrespondenceSettings:
    """Defaults, then ``preset``, then dataset defaults, then ``overrides`` (``None`` values = not given).

    >>> s = resolve_settings("dift-spair", limit=2)
    >>> s.t, s.ensemble, s.taps, s.comparison, s.thresholds
    (261, 8, ('us6',), '<=', ('bbox', 'img'))
    """
    names = {f.name for f in fields(CorrespondenceSettings)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    dataset = overrides.get("dataset", values.get("dataset", CorrespondenceSettings.dataset))
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    values.update(DATASET_DEFAULTS[dataset])
    values.update(overrides)
    settings = CorrespondenceSettings(**{k: _coerce(k, v) for k, v in values.items()})
    validate(settings)
    if preset and preset.endswith("-spair") and settings.dataset != "spair":
        log.warning("preset %s was defined for SPair-71k; running it on %s", preset, settings.dataset)
    return settings


def validate(s: CorrespondenceSettings) -> None:
    """Raise :class:`ConfigError` for out-of-range or inconsistent values."""
    for key, choices in _CHOICES.items():
        if getattr(s, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {getattr(s, key)!r}")
    if not s.taps:
        raise ConfigError("taps must name at least one tap")
    if s.ensemble < 1 or s.size < 1 or s.chunk_size < 1 or s.window < 0 or s.temperature <= 0:
        raise ConfigError("ensemble, size and chunk_size must be >= 1, window >= 0 and temperature > 0")
    if not s.alphas or any(a <= 0 for a in s.alphas):
        raise ConfigError(f"alphas must be positive, got {s.alphas}")
    bad = [k for k in (s.thresholds or ()) if k not in ("bbox", "img")]
    if bad or not s.thresholds:
        raise ConfigError(f"thresholds must be a non-empty subset of bbox, img; got {s.thresholds}")
    if s.dataset == "pfpascal" and "bbox" in s.thresholds:
        raise ConfigError("PF-Pascal pairs have no bounding boxes; use thresholds img")
    if s.limit is not None and s.limit < 1:
        raise ConfigError(f"limit must be >= 1, got {s.limit}")
    if "{" in s.prompt:
        try:
            s.prompt.format(category="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"prompt template {s.prompt!r} may only use {{category}} ({exc})") from exc


def _coerce(key: str, value: Any) -> Any:
    if key in ("taps", "categories", "thresholds"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(str(v) for v in value)
    if key == "alphas":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return tuple(float(v) for v in value)
    if key == "fusion":
        return dict(value)
    if key in ("t", "ensemble", "size", "seed", "window", "limit", "chunk_size"):
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value}")
        return int(value)
    if key in ("clean_timestep", "temperature"):
        return float(value)
    if key == "sample_posterior":
        return bool(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def preset_differences(settings: CorrespondenceSettings) -> dict[str, tuple[Any, Any]]:
    """``{key: (value, preset value)}`` where the settings depart from their preset (D1: warn on drift)."""
    if settings.preset is None:
        return {}
    reference = resolve_settings(settings.preset, dataset=settings.dataset)
    diffs = {}
    for key in PRESETS[settings.preset]:
        mine, theirs = getattr(settings, key), getattr(reference, key)
        if _jsonable(mine) != _jsonable(theirs):
            diffs[key] = (mine, theirs)
    return diffs


def feature_method(mode: str, checkpoint: str | None, descriptor: str = "diffusion") -> str:
    """The name results are labelled with, the same in every result file and plot.

    ``noisy`` (DIFT), ``clean`` (a CleanDIFT student on the clean image) or ``naive-clean`` (the
    *frozen* model on the clean image: a baseline, which is what clean mode without a checkpoint
    runs); ``dinov2`` has no diffusion features at all.
    """
    if descriptor == "dinov2":
        return "dinov2"
    if mode == "clean" and not checkpoint:
        return "naive-clean"
    return mode


# ---------------------------------------------------------------------------------------------- builders
def build_extractor(settings: CorrespondenceSettings, backbone):
    """Clean or noisy extractor for ``settings`` on a loaded backbone (student loaded from ``checkpoint``)."""
    from ..extract import CleanExtractor, NoisyExtractor  # noqa: PLC0415

    if settings.mode == "noisy":
        if settings.checkpoint:
            log.warning("checkpoint %s is ignored in noisy mode (DIFT uses the frozen backbone)",
                        settings.checkpoint)
        return NoisyExtractor(backbone, t=settings.t, ensemble=settings.ensemble, noise=settings.noise,
                              taps=list(settings.taps), chunk_size=settings.chunk_size,
                              sample_posterior=settings.sample_posterior)
    unet = backbone.unet
    if settings.checkpoint:
        from ..checkpoints import load_student  # noqa: PLC0415

        unet, ckpt = load_student(backbone.unet, settings.checkpoint)
        if ckpt.timestep is not None and abs(ckpt.timestep - settings.clean_timestep) > 1e-3:
            log.info("checkpoint stores a learned timestep %.3f; using clean_timestep=%g as set",
                     ckpt.timestep, settings.clean_timestep)
    else:
        log.warning("clean mode without a checkpoint runs the *frozen* backbone on clean latents "
                    "(the naive-clean baseline), not a CleanDIFT student; results are labelled 'naive-clean'")
    return CleanExtractor(backbone, unet=unet, timestep=settings.clean_timestep, taps=list(settings.taps),
                          chunk_size=settings.chunk_size, sample_posterior=settings.sample_posterior)


def build_descriptor(settings: CorrespondenceSettings, backbone=None, load_kwargs: dict | None = None):
    """The :class:`~cleandift.eval.descriptors.DenseDescriptor` that ``settings`` describe.

    ``diffusion`` is built here; the fusion kinds (``dinov2``, ``sd-dino``, ``tlfr``) are delegated to
    ``cleandift.eval.fusion.build_descriptor(settings, extractor=..., device=..., dtype=...)``, imported
    only when needed (``extractor`` is ``None`` for ``dinov2``). ``load_kwargs`` go to
    :func:`cleandift.backbones.load_backbone` (e.g. ``single_file_config``).
    """
    import importlib  # noqa: PLC0415

    from ..cli.common import resolve_device, resolve_dtype  # noqa: PLC0415

    device, dtype = resolve_device(settings.device), resolve_dtype(settings.dtype)
    extractor = None
    if settings.descriptor != "dinov2":
        if backbone is None:
            from ..backbones import load_backbone  # noqa: PLC0415

            backbone = load_backbone(settings.model, device=device, dtype=dtype, **(load_kwargs or {}))
        extractor = build_extractor(settings, backbone)
    if settings.descriptor == "diffusion":
        from .descriptors import DiffusionDescriptor  # noqa: PLC0415

        return DiffusionDescriptor(extractor, taps=settings.taps, size=settings.size, resize=settings.resize,
                                   seed=settings.seed, weights={"model": settings.model,
                                                                "checkpoint": settings.checkpoint})
    try:
        fusion = importlib.import_module("cleandift.eval.fusion")
    except ImportError as exc:
        raise ConfigError(f"descriptor {settings.descriptor!r} needs cleandift.eval.fusion, which is not "
                          f"available ({exc})") from exc
    if not hasattr(fusion, "build_descriptor"):
        raise ConfigError(f"cleandift.eval.fusion has no build_descriptor(); "
                          f"cannot build {settings.descriptor!r}")
    return fusion.build_descriptor(settings, extractor=extractor, device=device, dtype=dtype)
